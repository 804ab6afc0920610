"""`daemon.generation`: the decoding loop behind /v1/query and the OpenAI routes, on the tiny Llama."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from daemon.generation import (
    ContextOverflow,
    NoChatTemplate,
    Sampling,
    TokenLogprob,
    _nucleus,
    chat_prompt,
    check_context,
    generate,
    text_prompt,
)
from daemon.service_view import InvalidInput

PROMPTS = ["The capital of France is", "Acme is led by", "x", "The official language of Peru"]


class Pieces:
    """A sink that keeps what it is handed."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []

    def text(self, delta: str, logprobs: Sequence[TokenLogprob]) -> None:
        self.pieces.append(delta)
        self.logprobs.extend(logprobs)

    def cancelled(self) -> bool:
        return False


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_decoding_is_transformers_greedy_generate(tiny_lm: tuple[Any, Any], prompt: str) -> None:
    model, tokenizer = tiny_lm
    ids = text_prompt(tokenizer, prompt)
    ours = generate(model, tokenizer, ids, Sampling(max_tokens=12))
    inputs = torch.tensor([ids])
    with torch.no_grad():
        theirs = model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, len(ids) :]
    assert ours.completion_tokens == int(theirs.shape[0])  # an end-of-sequence token counts, as there
    assert ours.text == tokenizer.decode(theirs, skip_special_tokens=True)
    assert ours.finish_reason == ("stop" if int(theirs[-1]) == tokenizer.eos_token_id else "length")
    assert ours.prompt_tokens == len(ids)


def test_a_tiny_top_p_keeps_only_the_most_likely_token(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    ids = text_prompt(tokenizer, PROMPTS[0])
    greedy = generate(model, tokenizer, ids, Sampling(max_tokens=10))
    nucleus = generate(model, tokenizer, ids, Sampling(max_tokens=10, temperature=1.0, top_p=1e-6, seed=5))
    assert nucleus.text == greedy.text


def test_the_nucleus_is_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])

    def kept(top_p: float) -> list[bool]:
        nucleus = _nucleus(probs.clone(), top_p)
        assert torch.equal(nucleus[nucleus > 0], probs[nucleus > 0])  # kept as they were (multinomial renormalises)
        return (nucleus > 0).tolist()

    assert kept(0.7) == kept(0.75) == [False, True, False, True]
    assert kept(0.76) == [False, True, True, True]
    assert kept(0.01) == [False, True, False, False]
    assert kept(1.0) == [True, True, True, True]


def test_a_seed_makes_sampling_reproducible(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    ids = text_prompt(tokenizer, PROMPTS[1])
    runs = [generate(model, tokenizer, ids, Sampling(max_tokens=16, temperature=1.2, seed=seed)) for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0].text != runs[2].text


def test_streamed_pieces_add_up_to_the_text_and_never_show_a_stop_string(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    ids = text_prompt(tokenizer, PROMPTS[0])
    full = generate(model, tokenizer, ids, Sampling(max_tokens=24, logprobs=0)).text
    stop = full[6:9]
    sink = Pieces()
    cut = generate(model, tokenizer, ids, Sampling(max_tokens=24, stop=(stop,), logprobs=1), sink)
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert "".join(sink.pieces) == cut.text
    assert all(stop not in piece for piece in sink.pieces)
    assert sink.logprobs == list(cut.logprobs) and all(len(step.top) == 1 for step in cut.logprobs)


def test_logprobs_are_the_models_own_distribution(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    ids = text_prompt(tokenizer, PROMPTS[2])
    first = generate(model, tokenizer, ids, Sampling(max_tokens=1, temperature=0.3, seed=0, logprobs=3)).logprobs[0]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    best = torch.topk(log_probs, 3)
    assert [lp for _, lp in first.top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_prompts_beyond_the_context_are_refused(tiny_lm: tuple[Any, Any]) -> None:
    model, _ = tiny_lm
    context = model.config.max_position_embeddings
    check_context(model, context - 4, 4, "max_tokens")
    with pytest.raises(ContextOverflow, match="max_tokens 5 exceed the model's context") as raised:
        check_context(model, context - 4, 5, "max_tokens")
    assert isinstance(raised.value, InvalidInput)


def test_chat_prompts_use_the_template_and_keep_control_tokens_as_text(tiny_lm: tuple[Any, Any]) -> None:
    _, shared = tiny_lm
    with pytest.raises(NoChatTemplate, match="no chat template"):
        chat_prompt(shared, [("user", "hi")])
    tokenizer = copy.deepcopy(shared)
    tokenizer.chat_template = "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    ids = chat_prompt(tokenizer, [("system", "Be brief."), ("user", "Say <eos> please")])
    assert ids.count(tokenizer.eos_token_id) == 2  # the template's two, not the one inside the message
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system: Be brief.user: Say <eos> please"
