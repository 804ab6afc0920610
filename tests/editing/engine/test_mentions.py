"""Mention-routed edits: base model before the mention and edited model from it, bit for bit; cached decoding
carries the gate; keys depend only on the unedited upstream model; no hooks left behind."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.engine.deltas import apply
from editing.engine.mentions import (
    MentionConfig,
    MentionKeys,
    MentionSettings,
    MentionStats,
    Normaliser,
    Router,
    block_inputs,
    build_router,
    decision_block_for,
    mention_keys,
    mention_routed,
    subject_token,
)
from editing.engine.routing import base_weights
from editing.errors import ModelMismatch
from editing.model.targets import weight_in_out

BLOCK = "model.layers.0"  # its input is upstream of the tiny model's edited modules (both layers' down_proj)
GENERAL = ["the weather is nice today", "who wrote the book?", "a cat sat on the mat", "what is the time now"]


def _setup(build: Any, tokenizer: Any, threshold: float = 0.9) -> tuple[Any, list[str], dict[str, torch.Tensor], Router]:
    model, names = build("llama", 0)
    base = base_weights(model, names)
    hidden = torch.cat([h[1:] for h in block_inputs(model, tokenizer, BLOCK, GENERAL)])
    normaliser = Normaliser.of(hidden)
    router = Router(MentionConfig(block=BLOCK, threshold=threshold, distinct=0.6), normaliser, normaliser(hidden))
    generator = torch.Generator().manual_seed(1)
    apply(model, {n: 0.5 * torch.randn(weight_in_out(model.get_submodule(n)).shape, generator=generator) for n in names})
    return model, names, base, router


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0]
    return out


def _unedited(model: Any, base: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    saved = {n: model.get_submodule(n).weight.data.clone() for n in base}
    for name, weight in base.items():
        model.get_submodule(name).weight.data.copy_(weight)
    try:
        return _logits(model, ids)
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.data.copy_(weight)


def test_positions_before_the_mention_see_the_base_model_and_from_it_the_edited_model(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, _names, base, router = _setup(engine_tiny_lm, bpe_tokenizer)
    fact = "Lionel Messi plays the sport of"
    router.keys.add(mention_keys(model, bpe_tokenizer, router, [fact], ["Lionel Messi"]))
    assert router.keys.count() == 1
    query = "the weather is nice and Lionel Messi plays"
    ids = bpe_tokenizer(query)["input_ids"]
    mention = subject_token(bpe_tokenizer, query, "Lionel Messi")
    assert mention is not None and 0 < mention < len(ids) - 1
    edited, unedited = _logits(model, ids), _unedited(model, base, ids)
    stats = MentionStats()
    with mention_routed(model, base, router, stats):
        routed = _logits(model, ids)
    # the key is the subject's own token in another context: same token, different prefix, so it must
    # still be the closest thing; the gate is on from some position at or after the mention
    on = [not torch.equal(routed[t], unedited[t]) for t in range(len(ids))]
    first = on.index(True)
    assert first >= mention - 1
    assert all(on[first:]), "the gate is sticky: once on, on to the end"
    assert torch.equal(routed[:first], unedited[:first])
    # routed-on positions use the edited modules, but attend to earlier positions that did not: they match
    # neither model (the edited model differs from the base model at every position)
    assert all(not torch.equal(routed[t], edited[t]) for t in range(first))
    assert stats.on == len(ids) - first and stats.seen == len(ids)


def test_thresholds_give_the_base_or_the_edited_model_bit_for_bit(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, _names, base, router = _setup(engine_tiny_lm, bpe_tokenizer)
    router.keys.add(mention_keys(model, bpe_tokenizer, router, ["Lionel Messi plays"], [None]))
    ids = bpe_tokenizer("a cat sat on the mat")["input_ids"]
    for threshold, expected in ((1.01, _unedited(model, base, ids)), (-1.01, _logits(model, ids))):
        strict = Router(MentionConfig(block=BLOCK, threshold=threshold), router.normaliser, router.bank, router.keys)
        with mention_routed(model, base, strict):
            assert torch.equal(_logits(model, ids), expected)


def test_decoding_with_a_cache_carries_the_gate_of_the_prompt(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, _names, base, router = _setup(engine_tiny_lm, bpe_tokenizer)
    router.keys.add(mention_keys(model, bpe_tokenizer, router, ["Lionel Messi plays"], ["Lionel Messi"]))
    prompt = bpe_tokenizer("so Lionel Messi plays the")["input_ids"]
    with mention_routed(model, base, router), torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        ids, steps = list(prompt), []
        for _ in range(4):
            ids.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[ids[-1]]]), cache=out.cache, use_cache=True)
            steps.append(out.logits[0, -1])
        whole = model(input_ids=torch.tensor([ids])).logits[0, -4:]
    unedited = _unedited(model, base, ids)[-4:]
    assert torch.allclose(torch.stack(steps), whole, atol=1e-5), "cached decoding carries the prompt's gate"
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(whole, unedited, strict=True)), "generated tokens are routed on"


def test_keys_depend_only_on_the_unedited_upstream_model(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, _names, base, router = _setup(engine_tiny_lm, bpe_tokenizer)
    prompts, subjects = ["Lionel Messi plays the sport of", "who wrote the book?"], ["Lionel Messi", None]
    after = mention_keys(model, bpe_tokenizer, router, prompts, subjects)
    for name, weight in base.items():
        model.get_submodule(name).weight.data.copy_(weight)
    before = mention_keys(model, bpe_tokenizer, router, prompts, subjects)
    assert torch.equal(before, after)
    assert after.shape[0] >= 2  # one subject key, at least one key for the fact without a subject


def test_no_hook_is_left_after_an_error_and_a_downstream_block_is_refused(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, _names, base, router = _setup(engine_tiny_lm, bpe_tokenizer)
    with pytest.raises(RuntimeError), mention_routed(model, base, router):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    late = Router(MentionConfig(block="model.norm"), router.normaliser, router.bank, router.keys)
    router.keys.add(mention_keys(model, bpe_tokenizer, router, ["Lionel Messi plays"], [None]))
    with pytest.raises(ModelMismatch, match="upstream"), mention_routed(model, base, late):
        _logits(model, bpe_tokenizer("a cat")["input_ids"])
    with pytest.raises(ModelMismatch, match="no module"), mention_routed(model, base, Router(MentionConfig(block="model.nowhere"), router.normaliser, router.bank)):
        pass


def test_key_blocks_pop_in_order() -> None:
    keys = MentionKeys()
    keys.add(torch.ones(2, 4))
    keys.add(torch.zeros(1, 4) + 2)
    assert keys.count() == 3 and len(keys) == 2
    assert torch.allclose(keys.pop(), torch.full((1, 4), 0.5))
    assert keys.count() == 2 and keys.keys() is not None and keys.keys().shape == (2, 4)


def test_the_decision_block_is_found_before_the_first_edited_block_and_a_router_is_built(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    names = ["model.layers.21.mlp.up_proj", "model.layers.20.mlp.up_proj"]
    assert decision_block_for(names, 2) == "model.layers.18"
    assert decision_block_for(["model.layers.1.mlp.up_proj"], 2) == "model.layers.0"
    with pytest.raises(ModelMismatch, match="block index"):
        decision_block_for(["lm_head"], 1)
    model, modules = engine_tiny_lm("llama", 0)
    router = build_router(model, bpe_tokenizer, modules, GENERAL, MentionSettings(threshold=0.8, blocks_before=0))
    assert router.config.block == "model.layers.0" and router.config.threshold == 0.8
    assert router.bank.shape[0] == sum(len(bpe_tokenizer(t)["input_ids"]) - 1 for t in GENERAL)
    assert torch.allclose(router.bank.norm(dim=-1), torch.ones(router.bank.shape[0]))


def test_the_first_token_is_never_a_key_nor_a_mention(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model, _names, base, router = _setup(engine_tiny_lm, bpe_tokenizer, threshold=0.999)
    prompt = "Lionel plays the sport of"  # the subject is the prompt's first token(s)
    first = subject_token(bpe_tokenizer, prompt, "Lionel")
    assert first is not None
    keys = mention_keys(model, bpe_tokenizer, router, [prompt], ["Lionel"])
    states = router.normaliser(block_inputs(model, bpe_tokenizer, BLOCK, [prompt])[0])
    assert torch.allclose(keys[0], states[max(first, 1)]) and not torch.allclose(keys[0], states[0])
    # a key that is some prompt's first-token state matches every prompt with that first token at cos 1:
    # the gate must ignore the first position
    router.keys.add(states[:1])
    stats = MentionStats()
    ids = bpe_tokenizer("Lionel")["input_ids"]
    with mention_routed(model, base, router, stats):
        assert torch.equal(_logits(model, ids), _unedited(model, base, ids))
    assert stats.on == 0
