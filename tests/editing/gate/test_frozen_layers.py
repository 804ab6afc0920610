"""`FrozenLayers`: the gate's cache of the layers below the edited ones, and the upper-layers pass.

The contract: scores through the cache equal the full forward (float noise at most) on the live
weights, whatever the upper layers hold now; rows are served from the cache whatever batch they come
in; a model the scheme does not fit is detected, and the gate then runs every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.emsedit import EMSEditor
from editing.gate.batch_edit import GatedEditor
from editing.gate.checks import BatchChecker, Gate, GateFact
from editing.gate.config import GateConfig
from editing.gate.frozen_layers import FrozenLayers
from editing.gate.specificity import FrozenBase, ReferenceStore, SpecificityCheck
from editing.model.scoring import answer_scores, left_pad, next_token_logprobs, tail_logits
from editing.state.weights import WeightState

LAYERS = 4
LLAMA_MODULES = ["model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj"]


def _model(kind: str = "llama", vocab: int = 400) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    llama_like = {
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **special,
    }  # fmt: skip
    if kind == "llama":
        config: Any = LlamaConfig(**llama_like)
        names = LLAMA_MODULES
    elif kind == "qwen2":
        config = Qwen2Config(**llama_like)
        names = ["model.layers.2.mlp.up_proj"]
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256, **special)
        names = ["transformer.h.1.mlp.c_proj", "transformer.h.3.mlp.c_proj"]
    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model, names


ROWS = [[1, 5, 9, 13, 17], [1, 40, 41], [1, 7, 8, 9, 10, 11, 12, 99], [1, 3]]


def _batch(rows: Sequence[list[int]] = ROWS, keep: int = 2) -> Any:
    return left_pad(list(rows), [[0] * keep] * len(rows), 0)


def _perturb_upper(model: nn.Module, names: Sequence[str], scale: float = 0.5) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight  # type: ignore[union-attr]
            weight.add_(scale * torch.randn_like(weight))


# --- where the frozen layers are ------------------------------------------------------------------


def test_locate_finds_the_stack_and_the_lowest_edited_layer() -> None:
    model, _ = _model()
    frozen = FrozenLayers.locate(model, ["model.layers.3.mlp.up_proj", "model.layers.2.self_attn.o_proj"])
    assert frozen is not None
    assert (frozen.stack_name, frozen.first_edited) == ("model.layers", 2)
    gpt2, names = _model("gpt2")
    found = FrozenLayers.locate(gpt2, names)
    assert found is not None and (found.stack_name, found.first_edited) == ("transformer.h", 1)


@pytest.mark.parametrize(
    "names, tokens",
    [
        (["model.layers.0.mlp.up_proj", "model.layers.3.mlp.up_proj"], 1000),  # nothing below layer 0
        (["lm_head"], 1000),  # not inside a layer list
        (["model.layers.2.mlp.up_proj", "lm_head"], 1000),
        (LLAMA_MODULES, 0),  # switched off
        ([], 1000),
    ],
)
def test_locate_gives_none_when_nothing_can_be_cached(names: list[str], tokens: int) -> None:
    model, _ = _model()
    assert FrozenLayers.locate(model, names, tokens) is None


# --- the upper-layers pass equals the full forward ------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_upper_layers_pass_equals_the_full_forward_before_and_after_an_edit(kind: str, packed: bool) -> None:
    model, names = _model(kind)
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    assert frozen.verify(model, 0) is None
    assert frozen.packed  # these architectures take packed rows
    frozen.packed = packed
    batch = _batch()
    assert torch.allclose(frozen.tail_logits(model, batch, 0), tail_logits(model, batch), atol=1e-5)
    assert (frozen.misses, frozen.hits) == (len(ROWS), 0)
    # The upper layers change (an edit): the cached lower part still gives the full forward of the edited
    # model, and the rows are not run through the lower layers again.
    _perturb_upper(model, names)
    edited = tail_logits(model, batch)
    assert not torch.allclose(edited, tail_logits(_model(kind)[0], batch), atol=1e-3)  # the edit shows
    assert torch.allclose(frozen.tail_logits(model, batch, 0), edited, atol=1e-5)
    assert (frozen.misses, frozen.hits) == (len(ROWS), len(ROWS))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_rows_give_each_row_its_own_logits_whatever_its_neighbours(kind: str) -> None:
    model, names = _model(kind)
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None and frozen.packed
    _perturb_upper(model, names)
    # rows of one token, a duplicate, and more kept positions than the shortest row has: the logits of
    # each real position equal that row scored alone; positions before a row's start are not scored
    rows = [[1, 5, 9, 13, 17], [7], [1, 40, 41], [1, 5, 9, 13, 17], [2, 3]]
    batch = _batch(rows, keep=3)
    packed = frozen.tail_logits(model, batch, 0)
    assert packed.shape == (len(rows), 3, 400)
    for b, row in enumerate(rows):
        alone = tail_logits(model, _batch([row], keep=min(3, len(row))))[0]
        assert torch.allclose(packed[b, 3 - alone.shape[0] :], alone, atol=1e-5), row


def test_verify_falls_back_to_padded_rows_when_packing_does_not_reproduce_the_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, names = _model()
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    real = FrozenLayers._packed_tail

    def shifted(self: FrozenLayers, *args: Any) -> torch.Tensor:  # a model whose mask code ignores packing
        return real(self, *args) + 0.1 * torch.arange(400)

    monkeypatch.setattr(FrozenLayers, "_packed_tail", shifted)
    assert frozen.verify(model, 0) is None
    assert not frozen.packed
    batch = _batch()
    assert torch.allclose(frozen.tail_logits(model, batch, 0), tail_logits(model, batch), atol=1e-5)


def test_rows_are_reused_across_batches_of_other_shapes() -> None:
    model, names = _model()
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    frozen.tail_logits(model, _batch(ROWS[:2]), 0)
    # ROWS[0] now comes in a wider batch, with other padding, beside a new row and a duplicate
    batch = _batch([ROWS[2], ROWS[0], ROWS[0]], keep=3)
    assert torch.allclose(frozen.tail_logits(model, batch, 0), tail_logits(model, batch), atol=1e-5)
    assert frozen.misses == 3 and frozen.hits == 2
    assert frozen.cached_rows == 3
    assert frozen.cached_tokens == len(ROWS[0]) + len(ROWS[1]) + len(ROWS[2])


def test_scoring_functions_give_the_same_numbers_through_the_cache(bpe_tokenizer: Any) -> None:
    model, names = _model(vocab=len(bpe_tokenizer))
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    prompts = ["The capital of France is", "Who sang nice day?", "Lionel Messi plays"]
    answers = ["Paris", "the Beatles", "football"]
    full = next_token_logprobs(model, bpe_tokenizer, prompts, batch_size=2)
    cached = next_token_logprobs(model, bpe_tokenizer, prompts, batch_size=2, frozen=frozen)
    assert torch.allclose(full, cached, atol=1e-5)
    scores = answer_scores(model, bpe_tokenizer, prompts, answers, 2)
    through = answer_scores(model, bpe_tokenizer, prompts, answers, 2, frozen=frozen)
    assert torch.allclose(scores.log_likelihood, through.log_likelihood, atol=1e-4)
    assert torch.equal(scores.token_accuracy, through.token_accuracy)
    # a prefix (few-shot probes) is not served from the cache: the full forward runs
    misses = frozen.misses
    with_prefix = next_token_logprobs(model, bpe_tokenizer, prompts, 2, prefix="Q: A:", frozen=frozen)
    assert frozen.misses == misses
    assert torch.allclose(with_prefix, next_token_logprobs(model, bpe_tokenizer, prompts, 2, prefix="Q: A:"))


def test_least_recently_used_rows_go_when_the_cache_is_full() -> None:
    model, names = _model()
    frozen = FrozenLayers.locate(model, names, max_tokens=10)
    assert frozen is not None
    frozen.tail_logits(model, _batch([ROWS[0]]), 0)  # 5 tokens
    frozen.tail_logits(model, _batch([ROWS[1]]), 0)  # 3 tokens
    frozen.tail_logits(model, _batch([ROWS[0]]), 0)  # ROWS[0] is now the most recent
    frozen.tail_logits(model, _batch([ROWS[3]]), 0)  # 2 tokens: 10 in all, still fits
    assert frozen.cached_tokens == 10
    frozen.tail_logits(model, _batch([ROWS[2]]), 0)  # 8 tokens: the two least recent, ROWS[1] and ROWS[0], go
    assert frozen.cached_tokens == 10 and frozen.cached_rows == 2
    misses = frozen.misses
    frozen.tail_logits(model, _batch([ROWS[3], ROWS[2]]), 0)
    assert frozen.misses == misses
    frozen.tail_logits(model, _batch([ROWS[1]]), 0)
    assert frozen.misses == misses + 1
    # a batch larger than the whole cache is scored with every layer: same numbers, no failure
    batch = _batch([ROWS[0], ROWS[2]])
    assert torch.allclose(frozen.tail_logits(model, batch, 0), tail_logits(model, batch), atol=1e-5)


def test_the_swap_is_undone_even_when_the_pass_fails() -> None:
    model, names = _model()
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    layers = list(model.model.layers)  # type: ignore[union-attr]
    with pytest.raises(IndexError):
        frozen.tail_logits(model, _batch([[1, 10_000]]), 0)  # an id outside the vocabulary
    frozen.tail_logits(model, _batch(), 0)
    with pytest.raises(RuntimeError), frozen._upper_only(torch.zeros(1)):
        raise RuntimeError("inside the pass")
    assert list(model.model.layers) == layers  # type: ignore[union-attr]
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert torch.allclose(tail_logits(model, _batch()), frozen.tail_logits(model, _batch(), 0), atol=1e-5)


# --- recording the editor's own forward pass ------------------------------------------------------


def test_recording_caches_the_rows_a_right_padded_forward_runs() -> None:
    model, names = _model()
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    ids = torch.tensor([ROWS[0] + [0, 0, 0], ROWS[2]])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    with frozen.recording(model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert frozen.cached_rows == 2 and frozen.misses == 0
    model(input_ids=torch.tensor([ROWS[1]]))  # outside the block nothing is recorded
    assert frozen.cached_rows == 2
    batch = _batch([ROWS[2], ROWS[0]])
    assert torch.allclose(frozen.tail_logits(model, batch, 0), tail_logits(model, batch), atol=1e-5)
    assert (frozen.misses, frozen.hits) == (0, 2)


def test_recording_skips_rows_whose_positions_do_not_start_at_zero() -> None:
    model, names = _model()
    frozen = FrozenLayers.locate(model, names)
    assert frozen is not None
    # left padding without position ids: the model numbers the pads, so the real tokens start at 3
    ids = torch.tensor([[0, 0, 0] + ROWS[0]])
    with frozen.recording(model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    assert frozen.cached_rows == 0
    batch = _batch()
    with frozen.recording(model), torch.no_grad():  # with the positions from the mask it is recorded
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    assert frozen.cached_rows == len(ROWS)


# --- a model the scheme does not fit ---------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = hidden_states + torch.tanh(self.mlp(hidden_states))
        return out if skip is None else out + skip


class SkipConnectionLM(nn.Module):
    """A toy LM whose upper layers also read the first layer's output (a cross-layer connection)."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([_Block(width) for _ in range(3)])
        self.head = nn.Linear(width, vocab)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: Any) -> Any:
        hidden = self.embed(input_ids)
        first = self.layers[0](hidden)
        hidden = first
        for layer in self.layers[1:]:
            hidden = layer(hidden, skip=first)
        return SimpleNamespace(logits=self.head(hidden[:, -logits_to_keep:]))


def test_verify_reports_a_model_whose_upper_layers_read_a_lower_layer() -> None:
    model = SkipConnectionLM()
    frozen = FrozenLayers.locate(model, ["layers.2.mlp"])
    assert frozen is not None and frozen.first_edited == 2
    problem = frozen.verify(model, 0)
    assert problem is not None
    assert "packed upper-layers pass" in problem and "padded upper-layers pass differs from the full forward" in problem
    assert frozen.cached_rows == 0 and frozen.misses == 0  # verification leaves nothing behind


# --- in the gate -----------------------------------------------------------------------------------

UNRELATED = ["The capital of France is", "Who sang nice day?", "Lionel Messi plays the sport of"]
FACTS = [
    ("The capital of Italy is", "Paris", "nq question: who wrote the book?"),
    ("The mother tongue of Anna Berg is", "Spanish", "Walter Sobchak was born in"),
    ("Danielle Okafor is employed by", "Rome", "The capital of Peru is"),
    ("Walter Sobchak was born in", "Google", "Who sang the book?"),
]


def _gated(bpe_tokenizer: Any, config: GateConfig) -> GatedEditor:
    model, names = _model(vocab=len(bpe_tokenizer))
    editor = EMSEditor(model, bpe_tokenizer, names, EditorConfig(rank=8, n_blocks=2, edit_lr=1e-2))
    state = WeightState(model, names)
    base = FrozenBase.capture(model, "tiny", [f"{name}.weight" for name in names])
    checker = BatchChecker(config, SpecificityCheck(ReferenceStore(base), UNRELATED, batch_size=4))
    return GatedEditor(editor, state, Gate(config), checker)


def test_the_gate_measures_the_same_numbers_with_and_without_the_cache(
    bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    # Thresholds the untrained editor's batch fails on specificity: the bisection re-edits subsets,
    # so rows come back in other batches and the pre-batch state is measured too.
    config = GateConfig(
        min_efficacy=0.0, min_agreement=0.0, max_kl=100.0, min_batch_agreement=0.99, max_batch_kl=1e-6,
        batch_size=4, max_isolation_edits=8,
    )  # fmt: skip
    facts = [
        GateFact(k, EditExample(p, t, locality=((loc, "Paris"),))) for k, (p, t, loc) in enumerate(FACTS)
    ]
    cached = _gated(bpe_tokenizer, config)
    plain = _gated(bpe_tokenizer, config.model_copy(update={"frozen_layer_cache_tokens": 0}))
    with_cache, without = cached.edit(facts), plain.edit(facts)
    assert cached.frozen is not None and plain.frozen is None
    assert cached.frozen.first_edited == 2
    # the efficacy rows came from the editor's own forward pass: only prompts went through the lower layers
    assert cached.frozen.hits > cached.frozen.misses > 0
    assert with_cache.verdict.edits == without.verdict.edits > 1
    assert [(o.key, o.status) for o in with_cache.verdict.outcomes] == [
        (o.key, o.status) for o in without.verdict.outcomes
    ]
    for left, right in zip(with_cache.verdict.outcomes, without.verdict.outcomes, strict=True):
        assert left.numbers.keys() == right.numbers.keys()
        for key in left.numbers:
            assert left.numbers[key] == pytest.approx(right.numbers[key], abs=1e-4), key
