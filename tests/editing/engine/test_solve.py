"""The ridge solve: primal and dual forms agree; the hand-written backward matches autograd."""

from __future__ import annotations

import pytest
import torch

from editing.engine.solve import choose_form, ridge_solve


def _problem(rows: int, d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows, d_in, generator=gen, dtype=torch.float64)
    values = torch.randn(rows, d_out, generator=gen, dtype=torch.float64)
    return keys, values, torch.tensor(0.7, dtype=torch.float64)


def _reference(keys: torch.Tensor, values: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    gram = keys.T @ keys + lam * torch.eye(keys.shape[1], dtype=keys.dtype)
    return torch.linalg.solve(gram, keys.T @ values)


@pytest.mark.parametrize("rows,d_in", [(5, 12), (20, 6)])
def test_primal_and_dual_forms_agree(rows: int, d_in: int) -> None:
    keys, values, lam = _problem(rows, d_in, 4)
    primal = ridge_solve(keys, values, lam, "primal")
    dual = ridge_solve(keys, values, lam, "dual")
    torch.testing.assert_close(primal, dual, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(primal, _reference(keys, values, lam), rtol=1e-10, atol=1e-12)


def test_the_solution_minimises_the_ridge_objective() -> None:
    keys, values, lam = _problem(8, 5, 3)
    delta = ridge_solve(keys, values, lam).requires_grad_(True)
    objective = (keys @ delta - values).square().sum() + lam * delta.square().sum()
    (grad,) = torch.autograd.grad(objective, delta)
    assert grad.abs().max() < 1e-9


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_hand_written_backward_matches_autograd(form: str) -> None:
    keys, values, lam = _problem(7, 10, 3, seed=1)
    weight = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v1, l1 = values.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    v2, l2 = values.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    ours = (ridge_solve(keys, v1, l1.exp(), form) * weight).sum()  # through λ = exp(lamda), as the editor does
    ref = (_reference(keys, v2, l2.exp()) * weight).sum()
    grads = torch.autograd.grad(ours, [v1, l1])
    ref_grads = torch.autograd.grad(ref, [v2, l2])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_backward_passes_gradcheck() -> None:
    keys, values, lam = _problem(4, 6, 2, seed=3)
    for form in ("primal", "dual"):
        assert torch.autograd.gradcheck(
            lambda v, lm, f=form: ridge_solve(keys, v, lm, f), (values.requires_grad_(True), lam.requires_grad_(True))
        )


def test_form_choice_and_row_mismatch() -> None:
    assert choose_form(10, 576) == "dual" and choose_form(1000, 576) == "primal"
    assert choose_form(10, 576, "primal") == "primal"
    keys, values, lam = _problem(4, 6, 2)
    with pytest.raises(ValueError, match="rows"):
        ridge_solve(keys, values[:3], lam)


def test_a_key_prior_is_honoured_by_forward_and_backward() -> None:
    from editing.engine.solve import key_prior

    keys, values, lam = _problem(5, 6, 3, seed=4)
    mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    prior = key_prior(mean, var, 10.0)
    v1, l1 = values.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    v2, l2 = values.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    ours = ridge_solve(keys, v1, l1, "dual", prior)  # the prior forces the primal form
    gram = keys.T @ keys + l2 * torch.eye(6, dtype=torch.float64) + prior
    ref = torch.linalg.solve(gram, keys.T @ v2)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    weight = torch.randn(6, 3, dtype=torch.float64)
    got = torch.autograd.grad((ours * weight).sum(), [v1, l1])
    want = torch.autograd.grad((ref * weight).sum(), [v2, l2])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the mean key moves less with the prior than without
    plain = ridge_solve(keys, values, lam)
    assert (mean @ ours).norm() < (mean @ plain).norm()


def test_solving_on_keys_without_their_mean_leaves_the_shared_component_alone() -> None:
    from editing.engine.emsedit import project_out

    gen = torch.Generator().manual_seed(3)
    mean = 5.0 * torch.randn(32, generator=gen, dtype=torch.float64)  # the component every key shares
    keys = mean + torch.randn(6, 32, generator=gen, dtype=torch.float64)
    values = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    lam = torch.tensor(1e-6, dtype=torch.float64)
    plain = ridge_solve(keys, values, lam, "dual")
    projected = ridge_solve(project_out(keys, mean), values, lam, "dual")
    # both give the edit keys their values ...
    torch.testing.assert_close(keys @ plain, values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys @ projected, values, rtol=1e-5, atol=1e-5)
    # ... but only the projected solve leaves the response to the shared component unchanged
    assert (mean @ projected).abs().max() < 1e-8 < (mean @ plain).abs().max()
    unrelated = mean + torch.randn(50, 32, generator=gen, dtype=torch.float64)
    assert (unrelated @ projected).norm() < (unrelated @ plain).norm()
    torch.testing.assert_close(project_out(keys, torch.zeros(32, dtype=torch.float64)), keys)
