"""Applying and restoring edit plans: bit-exact restore in every dtype, fp32 masters, shape checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.engine.deltas import EditPlan, add_deltas, apply, master_copies, restore, snapshot
from editing.errors import ModelMismatch
from editing.model.targets import resolve_modules, weight_in_out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, state[name]) for name, p in model.named_parameters())


def _plan(model: torch.nn.Module, names: list[str], scale: float, seed: int = 0) -> EditPlan:
    gen = torch.Generator().manual_seed(seed)
    modules = resolve_modules(model, names)
    return EditPlan({n: scale * torch.randn(weight_in_out(m).shape, generator=gen) for n, m in modules.items()})


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_then_restore_is_bit_exact(model_type: str, dtype: torch.dtype, engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm(model_type, dtype=dtype)
    before = _state(model)
    saved = apply(model, _plan(model, names, 1e-3))
    assert not _same(model, before)
    restore(model, saved)
    assert _same(model, before)


def test_delta_lands_in_the_in_out_orientation(engine_tiny_lm: Any) -> None:
    for model_type in ("llama", "gpt2"):
        model, names = engine_tiny_lm(model_type)
        module = resolve_modules(model, names[:1])[names[0]]
        before = weight_in_out(module).clone()
        plan = _plan(model, names[:1], 1.0)
        apply(model, plan)
        torch.testing.assert_close(weight_in_out(module) - before, plan.deltas[names[0]])


def test_masters_keep_small_updates_that_bf16_rounds_away(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama", dtype=torch.bfloat16)
    masters = master_copies(model, names)
    start = {n: t.clone() for n, t in masters.items()}
    tiny = _plan(model, names, 1e-6)
    for _ in range(50):
        apply(model, tiny, masters)
    for name in names:
        torch.testing.assert_close(masters[name] - start[name], 50 * tiny.deltas[name], rtol=1e-2, atol=3e-7)
    without = engine_tiny_lm("llama", dtype=torch.bfloat16)[0]
    module = resolve_modules(without, names[:1])[names[0]]
    first = weight_in_out(module).float().clone()
    for _ in range(50):
        apply(without, tiny)
    want = 50 * tiny.deltas[names[0]]
    error = (weight_in_out(module).float() - first - want).norm() / want.norm()
    assert error > 0.5, "without masters bf16 rounding swallows most of the 1e-6 updates"


def test_restore_also_puts_the_masters_back(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama")
    masters = master_copies(model, names)
    copy = {n: t.clone() for n, t in masters.items()}
    saved = apply(model, _plan(model, names, 0.1), masters)
    restore(model, saved, masters)
    assert all(torch.equal(masters[n], copy[n]) for n in names)


def test_wrong_shape_or_module_is_refused_and_the_model_is_unchanged(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama")
    before = _state(model)
    bad = {names[0]: torch.zeros(3, 3)}
    with pytest.raises(ModelMismatch, match="shape"):
        apply(model, bad)
    with pytest.raises(ModelMismatch, match="not found"):
        apply(model, {"model.layers.9.mlp.up_proj": torch.zeros(3, 3)})
    assert _same(model, before)


def test_snapshot_and_sums(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama")
    before = _state(model)
    saved = snapshot(model, names)
    apply(model, _plan(model, names, 0.5))
    restore(model, saved)
    assert _same(model, before)
    a, b = _plan(model, names, 1.0, seed=1), _plan(model, names[:1], 1.0, seed=2)
    total = add_deltas(a.deltas, b.deltas)
    torch.testing.assert_close(total[names[0]], a.deltas[names[0]] + b.deltas[names[0]])
    assert torch.equal(total[names[1]], a.deltas[names[1]])
    assert a.total_norm() > 0
