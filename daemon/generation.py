"""Generating text from a loaded model: the one decoding loop behind /v1/query and the OpenAI routes.

`generate` continues a prompt given as token ids: greedy at temperature 0 (deterministic), otherwise
sampled with temperature and top-p from a generator of its own, seeded by the request when it gives a
seed (the same seed, prompt and weights give the same text, whatever else runs at the same time). It
stops at the model's end-of-sequence tokens, at a stop string (left out of the text) or after
`max_tokens`; it can report each token's log-probability with the most likely alternatives, and hand
the text to a `TextSink` as it grows, holding back what may still become a stop string.

Log-probabilities are those of the model's own next-token distribution (temperature 1, no top-p),
whatever the sampling settings, so they compare with /v1/query's answer probabilities.

The caller pins the weights for the whole call (`daemon.served_model`); nothing here takes a lock.
`text_prompt` and `chat_prompt` turn a prompt into token ids (the chat one with the tokenizer's own
chat template); `check_context` refuses a prompt and token budget the model cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from jinja2 import TemplateError
from torch import nn

from daemon.service_view import InvalidInput
from editing.model.scoring import model_device

FinishReason = Literal["stop", "length"]
#: The most alternatives a token's log-probability may list (OpenAI's own limit for chat).
MAX_TOP_LOGPROBS = 20


class ContextOverflow(InvalidInput):
    """The prompt plus the tokens asked for do not fit in the model's context."""

    code = "context_length_exceeded"


class NoChatTemplate(InvalidInput):
    """The model's tokenizer has no chat template, or the template refuses the messages."""

    code = "chat_template"


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt.

    `temperature` 0 is greedy decoding; `top_p` < 1 samples from the smallest set of tokens whose
    probability adds up to it. `seed` makes sampling reproducible (None: a fresh random seed).
    `logprobs` None reports none; k >= 0 reports each token's log-probability and its k most likely alternatives.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as text, its log-probability, and the most likely alternatives (text, log-probability)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    """A finished generation. `completion_tokens` counts every token generated, an end-of-sequence token
    included; `logprobs` (when asked for) has one entry per generated token except end-of-sequence."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()


class TextSink(Protocol):
    """Receives the text of a generation while it grows (for streaming)."""

    def text(self, delta: str, logprobs: Sequence[TokenLogprob]) -> None:
        """The next piece of text, with the log-probabilities of the tokens generated since the last piece."""
        ...

    def cancelled(self) -> bool:
        """True once nobody wants the rest (the client went away): generation stops after the current token."""
        ...


def context_length(model: nn.Module) -> int | None:
    """The most tokens (prompt plus generated) the model takes, when its configuration says so."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def check_context(model: nn.Module, prompt_tokens: int, max_tokens: int, what: str) -> None:
    """ContextOverflow when `prompt_tokens` plus `max_tokens` (named `what` in the message) exceed the context."""
    context = context_length(model)
    if context is not None and prompt_tokens + max_tokens > context:
        raise ContextOverflow(
            f"prompt: {prompt_tokens} tokens plus {what} {max_tokens} exceed the model's context of {context} "
            "tokens; shorten the prompt"
        )


def text_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of a raw prompt, with the tokenizer's special tokens (as the editor reads prompts)."""
    return [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def chat_prompt(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """The token ids of (role, content) messages in the tokenizer's chat template, ending with the assistant's turn.

    Control tokens written inside a message (say ``<|im_end|>``) are encoded as plain text, so a
    message cannot open a turn of another role.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("messages: this model's tokenizer has no chat template; send a raw prompt to /v1/completions")
    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
        )
    except TemplateError as exc:  # templates raise on what they cannot render (e.g. roles out of order)
        raise NoChatTemplate(f"messages: the model's chat template refuses them: {exc}") from None
    return [int(i) for i in ids]


def end_of_sequence_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a generation: the model's generation config's and the tokenizer's end-of-sequence."""
    found: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]) + [tokenizer.eos_token_id]:
        if isinstance(value, int):
            found.add(value)
    return frozenset(found)


def generate(
    model: nn.Module, tokenizer: Any, prompt_ids: Sequence[int], sampling: Sampling, sink: TextSink | None = None
) -> Generation:
    """Continue `prompt_ids` as `sampling` says; the caller keeps the weights still meanwhile.

    Checks no context length (see `check_context`). With `sink`, the text reaches it piece by piece
    as well; the concatenated pieces equal the returned text.
    """
    if sampling.max_tokens <= 0:
        return Generation("", len(prompt_ids), 0, "length")
    text = _GrowingText(tokenizer, sampling.stop, sink)
    chooser = _Chooser(sampling, model_device(model))
    finish = _decode(model, tokenizer, prompt_ids, sampling, chooser, text)
    text.flush()
    return Generation(text.final, len(prompt_ids), chooser.count, finish, tuple(text.logprobs))


def _decode(
    model: nn.Module, tokenizer: Any, prompt_ids: Sequence[int], sampling: Sampling, chooser: _Chooser, text: _GrowingText
) -> FinishReason:
    """The decoding loop: one forward pass per token, reusing the key/value cache."""
    device = model_device(model)
    ends = end_of_sequence_ids(model, tokenizer)
    with torch.no_grad():
        # `cache`, not `past_key_values`: transformers renamed it in 5.24 and drops the old name in 5.40
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True, logits_to_keep=1)
        while True:
            logits = out.logits[0, -1].float()
            token = chooser.choose(logits)
            if token in ends:
                return "stop"
            logprob = None if sampling.logprobs is None else _logprob(tokenizer, logits, token, sampling.logprobs)
            if text.add(token, logprob):
                return "stop"
            if chooser.count >= sampling.max_tokens or text.cancelled():
                return "length"
            out = model(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True, logits_to_keep=1)


class _Chooser:
    """Picks each next token: argmax at temperature 0, else a draw from a generator of its own."""

    def __init__(self, sampling: Sampling, device: torch.device) -> None:
        self.sampling = sampling
        self.count = 0
        self._generator: torch.Generator | None = None
        if sampling.temperature > 0:
            self._generator = torch.Generator(device=device)
            if sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(sampling.seed % 2**64)

    def choose(self, logits: torch.Tensor) -> int:
        self.count += 1
        if self._generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            probs = _nucleus(probs, self.sampling.top_p)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` kept on the smallest set of most likely tokens whose probability reaches `top_p` (the top one always)."""
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # probability of the tokens ranked above each one
    ordered[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def _logprob(tokenizer: Any, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    log_probs = torch.log_softmax(logits, dim=-1)
    alternatives: tuple[tuple[str, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(log_probs, min(top, MAX_TOP_LOGPROBS, int(log_probs.shape[-1])))
        alternatives = tuple((_piece(tokenizer, int(i)), float(v)) for v, i in zip(values, ids, strict=True))
    return TokenLogprob(_piece(tokenizer, token), float(log_probs[token]), alternatives)


def _piece(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token], skip_special_tokens=False))


@dataclass
class _GrowingText:
    """The decoded text of the tokens so far: stop strings found, and pieces handed to the sink when safe."""

    tokenizer: Any
    stops: tuple[str, ...]
    sink: TextSink | None
    final: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list)
    _sent: int = 0  # characters of `final` handed to the sink
    _unsent: list[TokenLogprob] = field(default_factory=list)

    def add(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Take one token; True when the text now holds a stop string (cut off before it)."""
        self._ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self._unsent.append(logprob)
        # Decoding all tokens again, not piece by piece: a character may span tokens.
        self.final = str(self.tokenizer.decode(self._ids, skip_special_tokens=True))
        cut = min((i for i in (self.final.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.final = self.final[: max(cut, self._sent)]
            return True
        self._send(len(self.final) - self._held_back())
        return False

    def _held_back(self) -> int:
        """How many final characters may still change: an unfinished character, or the start of a stop string."""
        text = self.final
        unfinished = len(text) - len(text.rstrip("\ufffd"))
        partial = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return max(unfinished, partial)

    def _send(self, upto: int) -> None:
        if self.sink is None or upto <= self._sent:
            return
        self.sink.text(self.final[self._sent : upto], tuple(self._unsent))
        self._sent, self._unsent = upto, []

    def flush(self) -> None:
        """Hand over whatever is left (at the end of the generation)."""
        if self.sink is not None and (len(self.final) > self._sent or self._unsent):
            self.sink.text(self.final[self._sent :], tuple(self._unsent))
            self._sent, self._unsent = len(self.final), []

    def cancelled(self) -> bool:
        return self.sink is not None and self.sink.cancelled()
