"""Compact, exactly reproducible storage of weight deltas: ΔW ≈ A·Bᵀ with int16 factors (docs/model-state.md).

An EMSEdit ΔW is a sum over S steps of ridge solutions Kᵀ(KKᵀ+λI)⁻¹V, so its rank is at most the
number of captured rows (answer tokens of the batch, times S): a few dozen to a few hundred, far
below 576 × 1536. `encode_delta` stores such a ΔW as

    A (d_in, r) int16,  ea (d_in,) int16,  B (d_out, r) int16,  eb (d_out,) int16

and `decode_delta` turns it back into the *canonical* float32 delta

    ΔW[i, j] = fp32( (Σ_k A[i,k]·B[j,k]) · 2^(ea[i] + eb[j]) ).

Exactness: every product A·B is an integer below 2^30 in magnitude and every partial sum of r ≤ 2^14
of them is an integer below 2^53, so the float64 matrix product is exact in any summation order,
blocking, thread count or device (with or without FMA). Multiplying by powers of two is exact, so
the only rounding is the final IEEE round-to-nearest conversion to float32. Decoding the same
tensors therefore gives the same bits everywhere; the committed delta is *defined* as the decoded
one, and the gate judges exactly those weights (encode before gating, see editing/state/history.py).

Encoding is lossy (relative Frobenius error about 1e-5 to 1e-4: int16 quantisation) and only has to
be good, not reproducible. A delta whose rank is too high to gain anything is stored dense in float32
(decoded bit for bit as given).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

INT16_MAX = 32767
#: Accept a range basis once it leaves less than this fraction of ‖ΔW‖ unexplained (float32 noise is ~1e-7).
RANGE_TOLERANCE = 1e-6
#: Drop singular directions below this fraction of the largest (below int16 resolution anyway).
SINGULAR_CUTOFF = 2.0**-20
#: Exponents are kept well inside float64's normal range so that scaling never under- or overflows.
EXPONENT_LIMIT = 400
FIRST_RANK_GUESS = 32
DECODE_ROW_BLOCK = 2048


@dataclass(frozen=True)
class DeltaCodecStats:
    """What encoding one module's ΔW did: stored rank (-1: dense), bytes and the canonical delta's error."""

    rank: int
    stored_bytes: int
    dense_bytes: int
    relative_error: float


def _pow2(exponents: torch.Tensor) -> torch.Tensor:
    """2.0 ** e as float64, built from the bit pattern (exact; e within ±1022)."""
    return ((exponents.to(torch.int64) + 1023) << 52).view(torch.float64)


def _quantise_rows(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a float64 factor as int16 values and per-row power-of-two exponents (value ≈ q · 2^e)."""
    if factor.shape[1] == 0:  # rank 0: a zero delta
        return factor.to(torch.int16), torch.zeros(factor.shape[0], dtype=torch.int16, device=factor.device)
    peak = factor.abs().amax(dim=1)
    _, exponent = torch.frexp(peak)  # peak = f · 2^exponent, f in [0.5, 1)
    exponent = torch.where(peak > 0, exponent - 15, torch.zeros_like(exponent))
    scaled = factor * _pow2(-exponent)[:, None]
    values = scaled.round().clamp(-INT16_MAX, INT16_MAX).to(torch.int16)
    return values, exponent.to(torch.int16)


def _range_basis(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Q (d_in, k) orthonormal and P = ΔWᵀQ with ‖ΔW − Q Pᵀ‖ small; None when no k beats dense storage.

    A randomised range finder whose only decompositions are eigh of q × q Gram matrices: LAPACK
    factorisations of the full 576 × 1536 matrix are slow, and pathologically so on a busy machine.
    """
    d_in, d_out = delta.shape
    norm_sq = float(delta.square().sum())
    generator = torch.Generator(device=delta.device).manual_seed(0)
    q = min(FIRST_RANK_GUESS, d_in, d_out)
    while _factor_bytes(q, d_in, d_out) < d_in * d_out * 4:
        omega = torch.randn(d_out, q, dtype=delta.dtype, device=delta.device, generator=generator)
        sample = delta @ omega  # (d_in, q), spans the range of ΔW once q >= its rank
        eigenvalues, vectors = torch.linalg.eigh(sample.T @ sample)
        keep = eigenvalues > eigenvalues[-1] * SINGULAR_CUTOFF**2
        basis = sample @ (vectors[:, keep] / eigenvalues[keep].sqrt())  # orthonormal columns
        projected = delta.T @ basis  # (d_out, k)
        # Q orthonormal: ‖ΔW − QQᵀΔW‖² = ‖ΔW‖² − ‖QᵀΔW‖² (exact enough in float64 for this test).
        residual_sq = max(norm_sq - float(projected.square().sum()), 0.0)
        if residual_sq <= RANGE_TOLERANCE**2 * norm_sq:
            return basis, projected
        if q >= min(d_in, d_out):
            return None
        q = min(2 * q, d_in, d_out)
    return None


def _peak(exponents: torch.Tensor) -> int:
    return int(exponents.abs().max()) if exponents.numel() else 0


def _factor_bytes(rank: int, d_in: int, d_out: int) -> int:
    return 2 * rank * (d_in + d_out) + 2 * (d_in + d_out)


def encode_delta(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode one float32 ΔW (d_in, d_out) as int16 factors (keys a, ea, b, eb) or, if smaller, dense (key dense)."""
    if delta.dim() != 2 or delta.dtype != torch.float32:
        raise ValueError(f"a delta is a 2-D float32 tensor, got {delta.dtype} of shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("a delta with NaN or infinite entries cannot be committed")
    wide = delta.detach().double()
    found = _range_basis(wide) if bool(wide.any()) else (wide[:, :0], wide.T[:, :0].contiguous())
    if found is None:
        return {"dense": delta.detach().clone().cpu()}
    basis, projected = found
    # Rotate to the singular directions (PᵀP = V Σ² Vᵀ), drop negligible ones and split σ evenly:
    # ΔW ≈ Q Pᵀ = (Q V Σ^½)(P V Σ^-½)ᵀ.
    sigma_sq, rotation = torch.linalg.eigh(projected.T @ projected)
    keep = sigma_sq > (sigma_sq[-1] if sigma_sq.numel() else 0.0) * SINGULAR_CUTOFF**2
    root = sigma_sq[keep].sqrt().sqrt()
    left = (basis @ rotation[:, keep]) * root  # (d_in, r)
    right = (projected @ rotation[:, keep]) / root  # (d_out, r)
    a, ea = _quantise_rows(left)
    b, eb = _quantise_rows(right)
    if _peak(ea) + _peak(eb) > EXPONENT_LIMIT:
        return {"dense": delta.detach().clone().cpu()}
    return {"a": a.cpu(), "ea": ea.cpu(), "b": b.cpu(), "eb": eb.cpu()}


def decode_delta(parts: Mapping[str, torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The canonical float32 ΔW of encoded `parts`: the same bits on every machine (module docstring)."""
    if "dense" in parts:
        return parts["dense"].to(device=device, dtype=torch.float32).clone()
    a, b = parts["a"].to(device), parts["b"].to(device)
    row_scale = _pow2(parts["ea"].to(device))
    col_scale = _pow2(parts["eb"].to(device))
    b_wide = b.double().T  # (r, d_out)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=device)
    for start in range(0, a.shape[0], DECODE_ROW_BLOCK):
        stop = start + DECODE_ROW_BLOCK
        exact = a[start:stop].double() @ b_wide  # integer-valued, exact (module docstring)
        scaled = exact * row_scale[start:stop, None] * col_scale[None, :]  # powers of two: exact
        out[start:stop] = scaled.to(torch.float32)  # the one rounding
    return out


def encoded_bytes(parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in an encoded delta."""
    return sum(t.numel() * t.element_size() for t in parts.values())


def encode_deltas(
    deltas: Mapping[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, DeltaCodecStats]]:
    """Encode every module's ΔW: (encoded parts per module, canonical deltas on the input devices, stats)."""
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    canonical: dict[str, torch.Tensor] = {}
    stats: dict[str, DeltaCodecStats] = {}
    for name, delta in deltas.items():
        parts = encode_delta(delta.float())
        decoded = decode_delta(parts, delta.device)
        norm = float(torch.linalg.matrix_norm(delta.double()))
        error = float(torch.linalg.matrix_norm(decoded.double() - delta.double())) / norm if norm else 0.0
        rank = -1 if "dense" in parts else int(parts["a"].shape[1])
        encoded[name] = parts
        canonical[name] = decoded
        stats[name] = DeltaCodecStats(rank, encoded_bytes(parts), delta.numel() * 4, error)
    return encoded, canonical, stats
