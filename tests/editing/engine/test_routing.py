"""Routed edits: base model bit for bit when no token matches, edited model when all do, per-token gates, no hooks left."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch

from editing.engine.deltas import apply
from editing.engine.edit_memory import remember
from editing.engine.emsedit import answer_loss
from editing.engine.routing import KeyStore, RouteConfig, RouteStats, answer_keys, base_weights, routed, state_keys
from editing.model.targets import resolve_modules, weight_in_out
from editing.model.tokenise import tokenise
from editing.model.tracing import trace_modules

PROMPTS = ["The capital of France is", "Lionel Messi plays the sport of", "who wrote the book?"]
ANSWERS = ["Paris", "football", "Walter Sobchak"]


def _edited(build: Any, model_type: str) -> tuple[Any, list[str], dict[str, torch.Tensor]]:
    """A tiny model, its edited modules and their base weights, with a random ΔW applied."""
    model, names = build(model_type, 0)
    base = base_weights(model, names)
    generator = torch.Generator().manual_seed(1)
    deltas = {n: 0.5 * torch.randn(weight_in_out(model.get_submodule(n)).shape, generator=generator) for n in names}
    apply(model, deltas)
    return model, names, base


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    batch = tokenise(tokenizer, PROMPTS, ANSWERS)
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return out


def _store(model: Any, tokenizer: Any, names: list[str]) -> KeyStore:
    store = KeyStore()
    store.add(answer_keys(model, tokenizer, names, PROMPTS[:1], ANSWERS[:1]))
    return store


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_threshold_above_one_gives_the_base_model_and_minus_one_the_edited_model_bit_for_bit(
    engine_tiny_lm: Any, bpe_tokenizer: Any, model_type: str
) -> None:
    model, names, base = _edited(engine_tiny_lm, model_type)
    edited = _logits(model, bpe_tokenizer)
    store = _store(model, bpe_tokenizer, names)
    with routed(model, base, store, RouteConfig(threshold=1.01)):
        never = _logits(model, bpe_tokenizer)
    with routed(model, base, store, RouteConfig(threshold=-1.0)):
        always = _logits(model, bpe_tokenizer)
    for name, weight in base.items():
        model.get_submodule(name).weight.data.copy_(weight)
    unedited = _logits(model, bpe_tokenizer)
    assert not torch.equal(edited, unedited)
    assert torch.equal(never, unedited)
    assert torch.equal(always, edited)


def test_a_token_matching_a_stored_key_gets_the_delta_and_an_orthogonal_one_does_not(engine_tiny_lm: Any) -> None:
    model, names, base = _edited(engine_tiny_lm, "llama")
    name = names[0]
    module = model.get_submodule(name)
    key = torch.randn(module.in_features, generator=torch.Generator().manual_seed(2))
    other = torch.randn(module.in_features, generator=torch.Generator().manual_seed(3))
    other = other - (other @ key) / (key @ key) * key  # orthogonal to the stored key
    inputs = torch.stack([3.0 * key, other]).unsqueeze(0)  # (1, 2, d): a scaled copy matches with cosine 1
    store = KeyStore()
    store.add({name: key.unsqueeze(0)})
    stats = RouteStats()
    with torch.no_grad(), routed(model, base, store, RouteConfig(threshold=0.9), stats):
        out = module(inputs)
    with torch.no_grad():
        live = module(inputs)
        unedited = torch.nn.functional.linear(inputs, base[name])
    assert torch.equal(out[0, 0], live[0, 0])
    assert torch.equal(out[0, 1], unedited[0, 1])
    assert stats.on == {name: 1} and stats.seen == {name: 2}
    assert stats.shares() == {name: 0.5}


def test_the_soft_gate_mixes_base_and_edited_outputs_by_the_sigmoid_of_the_margin(engine_tiny_lm: Any) -> None:
    model, names, base = _edited(engine_tiny_lm, "llama")
    name = names[0]
    module = model.get_submodule(name)
    key = torch.randn(1, module.in_features, generator=torch.Generator().manual_seed(2))
    store = KeyStore()
    store.add({name: key})
    with torch.no_grad(), routed(model, base, store, RouteConfig(threshold=1.0, temperature=0.1)):
        out = module(key)
    with torch.no_grad():
        live, unedited = module(key), torch.nn.functional.linear(key, base[name])
    torch.testing.assert_close(out, (live + unedited) / 2)  # cosine 1 = τ: σ(0) = 1/2
    with pytest.raises(ValueError, match="temperature"):
        RouteConfig(threshold=0.5, temperature=0.0)


def test_hooks_are_gone_after_the_block_also_after_an_exception(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, names, base = _edited(engine_tiny_lm, "llama")
    edited = _logits(model, bpe_tokenizer)
    store = _store(model, bpe_tokenizer, names)
    with routed(model, base, store, RouteConfig(threshold=1.01)):
        assert all(len(model.get_submodule(n)._forward_hooks) == 1 for n in names)
    with pytest.raises(RuntimeError, match="boom"), routed(model, base, store, RouteConfig(threshold=1.01)):
        raise RuntimeError("boom")
    assert all(not model.get_submodule(n)._forward_hooks for n in names)
    assert torch.equal(_logits(model, bpe_tokenizer), edited)


def test_a_module_without_keys_routes_everything_off_and_keys_added_inside_the_block_act_at_once(
    engine_tiny_lm: Any, bpe_tokenizer: Any
) -> None:
    model, names, base = _edited(engine_tiny_lm, "llama")
    edited = _logits(model, bpe_tokenizer)
    keys = answer_keys(model, bpe_tokenizer, names, PROMPTS[:1], ANSWERS[:1])
    store = KeyStore()
    with routed(model, base, store, RouteConfig(threshold=-1.0)):
        empty = _logits(model, bpe_tokenizer)
        store.add(keys)
        full = _logits(model, bpe_tokenizer)
        assert store.pop().keys() == keys.keys()
        assert torch.equal(_logits(model, bpe_tokenizer), empty)
    assert not torch.equal(empty, edited)
    assert torch.equal(full, edited)


def test_the_store_normalises_and_counts_its_keys() -> None:
    store = KeyStore()
    store.add({"a": torch.tensor([[3.0, 4.0], [0.0, 0.0]]), "b": torch.ones(1, 3)})
    store.add({"a": torch.tensor([[0.0, 2.0]])})
    stacked = store.keys("a")
    assert stacked is not None
    torch.testing.assert_close(stacked, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, 1.0]]))
    assert (store.count("a"), store.count("b"), store.count("c"), len(store)) == (3, 1, 0, 2)
    assert store.keys("c") is None
    assert store.nbytes() == 4 * (6 + 3)


def test_state_keys_recover_the_remembered_keys_within_the_quantisation() -> None:
    keys = {"m": 3.0 * torch.randn(5, 16, generator=torch.Generator().manual_seed(0))}
    recovered = state_keys(remember({}, keys))
    assert set(recovered) == {"m"}
    torch.testing.assert_close(recovered["m"], keys["m"], atol=float(keys["m"].abs().max()) * 1e-4, rtol=0.0)
    assert state_keys({}) == {}


def test_a_trace_sees_the_routed_outputs_even_when_it_was_entered_first(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, names, base = _edited(engine_tiny_lm, "llama")
    batch = tokenise(bpe_tokenizer, PROMPTS, ANSWERS)
    store = _store(model, bpe_tokenizer, names)

    def gradients(route: bool) -> torch.Tensor:
        with torch.enable_grad(), trace_modules(resolve_modules(model, names)) as trace:
            trace.select = batch.answer_mask
            with routed(model, base, store, RouteConfig(threshold=1.01)) if route else nullcontext():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            answer_loss(logits, batch.labels).backward()  # type: ignore[no-untyped-call]
        return trace.stacked(names[-1])[1]

    routed_grads = gradients(True)
    for name, weight in base.items():
        model.get_submodule(name).weight.data.copy_(weight)
    torch.testing.assert_close(routed_grads, gradients(False), rtol=1e-5, atol=1e-7)
