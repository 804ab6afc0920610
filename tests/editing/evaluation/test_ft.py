"""The FT-L baseline on tiny models: it learns the edits, respects the L-inf ball, and never writes the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from editing.data import EditExample
from editing.engine.deltas import apply, restore
from editing.evaluation.baselines.ft import FTConfig, FTEditor
from editing.model.edit_metrics import evaluate_examples
from editing.model.targets import resolve_modules, weight_in_out

EXAMPLES = [
    EditExample("The capital of France is", "Rome"),
    EditExample("The mother tongue of Anna Berg is", "Spanish"),
    EditExample("Walter Sobchak was born in", "Paris"),
    EditExample("Danielle Okafor is employed by", "Google"),
]
MODULES = {
    "llama": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"],
    "gpt2": ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"],
}


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _efficacy(model: Any, tokenizer: Any) -> float:
    return evaluate_examples(model, tokenizer, EXAMPLES).summary()["efficacy"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ft_learns_the_edits_without_touching_the_model(
    model_type: str, gate_tiny_lm: Callable[..., Any], bpe_tokenizer: Any
) -> None:
    model = gate_tiny_lm(model_type, seed=5)
    names = MODULES[model_type]
    before = _efficacy(model, bpe_tokenizer)
    state = _state(model)
    config = FTConfig(steps=15, lr=3e-2, norm_constraint=0.2)
    plan = FTEditor(model, bpe_tokenizer, names, config).propose(EXAMPLES)
    # the model is bit-identical, with no gradients left on it
    after_propose = model.state_dict()
    assert all(torch.equal(state[k], after_propose[k]) for k in state)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # ΔW: float32, (in, out), inside the L-inf ball, and the loss went down
    modules = resolve_modules(model, names)
    for name in names:
        delta = plan.deltas[name]
        assert delta.dtype == torch.float32
        assert delta.shape == weight_in_out(modules[name]).shape
        assert float(delta.abs().max()) <= config.norm_constraint + 1e-7
    assert plan.steps[-1].edit_loss < plan.steps[0].edit_loss
    # applied by the harness, the edit raises efficacy; restoring gives the model back exactly
    snapshot = apply(model, plan)
    edited = _efficacy(model, bpe_tokenizer)
    assert edited >= 0.75 and edited > before + 0.5
    restore(model, snapshot)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_the_constraint_binds(gate_tiny_lm: Callable[..., Any], bpe_tokenizer: Any) -> None:
    model = gate_tiny_lm("llama", seed=6)
    eps = 1e-3
    plan = FTEditor(model, bpe_tokenizer, MODULES["llama"], FTConfig(steps=5, lr=1e-2, norm_constraint=eps)).propose(
        EXAMPLES
    )
    largest = max(float(d.abs().max()) for d in plan.deltas.values())
    assert largest == pytest.approx(eps)


def test_masters_are_the_starting_point(gate_tiny_lm: Callable[..., Any], bpe_tokenizer: Any) -> None:
    model = gate_tiny_lm("llama", seed=7)
    names = MODULES["llama"]
    modules = resolve_modules(model, names)
    masters = {n: weight_in_out(m).detach().float().clone() for n, m in modules.items()}
    config = FTConfig(steps=3, lr=1e-2, norm_constraint=None)
    from_weights = FTEditor(model, bpe_tokenizer, names, config).propose(EXAMPLES)
    from_masters = FTEditor(model, bpe_tokenizer, names, config).propose(EXAMPLES, masters=masters)
    assert all(torch.allclose(from_weights.deltas[n], from_masters.deltas[n]) for n in names)
    masters_copy = {n: t.clone() for n, t in masters.items()}
    FTEditor(model, bpe_tokenizer, names, config).propose(EXAMPLES, masters=masters)
    assert all(torch.equal(masters[n], masters_copy[n]) for n in names)


def test_early_stop_and_bad_config(gate_tiny_lm: Callable[..., Any], bpe_tokenizer: Any) -> None:
    model = gate_tiny_lm("llama", seed=8)
    plan = FTEditor(model, bpe_tokenizer, MODULES["llama"], FTConfig(early_stop_loss=1e9)).propose(EXAMPLES)
    assert plan.steps == ()
    assert all(not d.any() for d in plan.deltas.values())
    with pytest.raises(ValueError, match="norm_constraint must be positive"):
        FTConfig(norm_constraint=0.0)
    with pytest.raises(ValueError, match="steps >= 1"):
        FTConfig(steps=0)
