"""The ridge (normal-equation) solve that aggregates per-row value changes into one ΔW (spec §4.2-4.4).

    ΔW = argmin_W Σ_i ‖u_iᵀ W − v_iᵀ‖² + λ‖W‖_F² = (KᵀK + λI)⁻¹ KᵀV        (primal, d_in × d_in system)
                                                 = Kᵀ (KKᵀ + λI_N)⁻¹ V      (dual, N × N system)

K: (N, d_in) raw keys, V: (N, d_out) desired output changes, λ > 0. The dual form is used when
N < d_in (the usual case: a few answer tokens per fact), the primal one otherwise. Both are exact.

`ridge_solve` is differentiable in V and λ through a hand-written backward (K is a constant, as in
MALMEN's two-pass training): with G = ∂L/∂ΔW and M = KᵀK + λI,
    ∂L/∂V = K M⁻¹ G,   ∂L/∂λ = −⟨M⁻¹ G, ΔW⟩_F,   M⁻¹G = (G − Kᵀ (KKᵀ + λI)⁻¹ K G) / λ (dual).
Everything runs in float32 (or the dtype of the inputs, float64 in tests).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

SolveForm = Literal["auto", "primal", "dual"]


def choose_form(n_rows: int, key_size: int, form: SolveForm = "auto") -> Literal["primal", "dual"]:
    """The form whose linear system is smaller, unless one is forced."""
    if form != "auto":
        return form
    return "dual" if n_rows < key_size else "primal"


def _identity(size: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(size, dtype=like.dtype, device=like.device)


def _primal_gram(keys: torch.Tensor, lam: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    gram = keys.T @ keys + lam * _identity(keys.shape[1], keys)  # (d_in, d_in)
    return gram if prior is None else gram + prior


def _forward(
    keys: torch.Tensor, values: torch.Tensor, lam: torch.Tensor, form: str, prior: torch.Tensor | None
) -> torch.Tensor:
    if form == "primal":
        gram = _primal_gram(keys, lam, prior)
        primal: torch.Tensor = torch.linalg.solve(gram, keys.T @ values)
        return primal
    gram = keys @ keys.T + lam * _identity(keys.shape[0], keys)  # (N, N)
    dual: torch.Tensor = keys.T @ torch.linalg.solve(gram, values)
    return dual


def _inv_gram_times(
    keys: torch.Tensor, lam: torch.Tensor, rhs: torch.Tensor, form: str, prior: torch.Tensor | None
) -> torch.Tensor:
    """M⁻¹ rhs for M = KᵀK + λI (+ prior), rhs of shape (d_in, d_out)."""
    if form == "primal":
        primal: torch.Tensor = torch.linalg.solve(_primal_gram(keys, lam, prior), rhs)
        return primal
    small = torch.linalg.solve(keys @ keys.T + lam * _identity(keys.shape[0], keys), keys @ rhs)  # (N, d_out)
    dual: torch.Tensor = (rhs - keys.T @ small) / lam
    return dual


class _RidgeSolve(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, keys: torch.Tensor, values: torch.Tensor, lam: torch.Tensor, form: str, prior: torch.Tensor | None
    ) -> torch.Tensor:
        delta = _forward(keys, values, lam, form, prior)
        ctx.save_for_backward(keys, lam, delta)
        ctx.form = form
        ctx.prior = prior
        return delta

    @staticmethod
    def backward(
        ctx: Any, grad_delta: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None, None]:
        keys, lam, delta = ctx.saved_tensors
        inv_g = _inv_gram_times(keys, lam, grad_delta, ctx.form, ctx.prior)  # M⁻¹G, (d_in, d_out)
        grad_values = keys @ inv_g if ctx.needs_input_grad[1] else None
        grad_lam = -(inv_g * delta).sum().reshape(lam.shape) if ctx.needs_input_grad[2] else None
        return None, grad_values, grad_lam, None, None


def ridge_solve(
    keys: torch.Tensor,
    values: torch.Tensor,
    lam: torch.Tensor,
    form: SolveForm = "auto",
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW (d_in, d_out) = (KᵀK + λI + P)⁻¹ KᵀV; differentiable in `values` and `lam` (0-d tensor).

    `prior` P (d_in, d_in, symmetric positive semi-definite, a constant) adds the penalty Σ ‖u ΔW‖² over
    the keys it summarises (see `key_prior`); with it the primal form is always used.
    """
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"keys have {keys.shape[0]} rows but values have {values.shape[0]}")
    chosen = "primal" if prior is not None else choose_form(keys.shape[0], keys.shape[1], form)
    result: torch.Tensor = _RidgeSolve.apply(keys, values, lam, chosen, prior)  # type: ignore[no-untyped-call]
    return result


def key_prior(mean: torch.Tensor, var: torch.Tensor, weight: float) -> torch.Tensor:
    """P = weight · E[u uᵀ] ≈ weight · (diag(var) + μ μᵀ) from running key statistics (d_in,).

    Penalising ‖u ΔW‖² over typical keys u keeps an edit from moving every prompt alike: raw keys share a
    large common component (μ), so the plain ridge solve changes unrelated prompts almost as much as the
    edited ones. This is the MEMIT-style preservation term, approximated with the normaliser's
    mean and (diagonal) variance; it is this project's option, not part of EMSEdit.
    """
    prior: torch.Tensor = weight * (torch.diag(var) + torch.outer(mean, mean))
    return prior
