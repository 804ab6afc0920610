"""Tracing keys and output gradients: exact values, nothing left behind on the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.engine.emsedit import answer_loss, lm_logits
from editing.model.targets import resolve_modules
from editing.model.tokenise import tokenise
from editing.model.tracing import trace_modules

PROMPTS = ["The capital of France is", "Lionel Messi plays the sport of", "Who sang nice day"]
ANSWERS = ["Paris", "football", "Walter Sobchak"]


def _hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_weight_gradients_equal_autograd_for_every_edited_module(
    model_type: str, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = engine_tiny_lm(model_type)
    modules = resolve_modules(model, names)
    batch = tokenise(bpe_tokenizer, PROMPTS, ANSWERS)
    with trace_modules(modules, weight_grads=True) as trace:
        trace.select = batch.answer_mask
        answer_loss(lm_logits(model, batch), batch.labels).backward()
    for module in modules.values():
        module.weight.requires_grad_(True)
    answer_loss(lm_logits(model, batch), batch.labels).backward()
    for name, module in modules.items():
        grad = module.weight.grad
        assert grad is not None
        want = grad.T if isinstance(module, torch.nn.Linear) else grad
        torch.testing.assert_close(trace.weight_grads[name], want, rtol=1e-4, atol=1e-7)
    model.requires_grad_(False)


def test_keys_and_gradients_are_taken_at_the_answer_positions(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = engine_tiny_lm("llama")
    modules = resolve_modules(model, names[:1])
    module = modules[names[0]]
    batch = tokenise(bpe_tokenizer, PROMPTS, ANSWERS)
    seen: dict[str, torch.Tensor] = {}

    def keep(_: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["input"] = inputs[0].detach()

    handle = module.register_forward_hook(keep)
    with trace_modules(modules) as trace:
        trace.select = batch.answer_mask
        answer_loss(lm_logits(model, batch), batch.labels).backward()
    handle.remove()
    keys, grads = trace.stacked(names[0])
    rows = int(batch.answer_mask.sum())
    assert keys.shape == (rows, 128) and grads.shape == (rows, 64)  # down_proj: 128 -> 64
    torch.testing.assert_close(keys, seen["input"][batch.answer_mask])
    assert keys.dtype == torch.float32 and grads.abs().sum() > 0


def test_no_hook_remains_after_the_block_even_on_error(engine_tiny_lm: Any, engine_single_thread: None) -> None:
    model, names = engine_tiny_lm("llama")
    modules = resolve_modules(model, names)
    before = _hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), trace_modules(modules):
        assert _hooks_left(model) == before + len(names)
        raise RuntimeError("boom")
    assert _hooks_left(model) == before
    params_before = {n: p.requires_grad for n, p in model.named_parameters()}
    with trace_modules(modules) as trace:
        model(input_ids=torch.tensor([[1, 5, 6]]))
    assert _hooks_left(model) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == params_before
    assert not any(vars(m).get("__x__") is not None for m in model.modules())
    assert len(trace.keys[names[0]]) == 1 and not trace.grads
