"""Mention-routed edits: a committed edit acts on a sequence only from the token where it mentions an edited fact.

The gate is decided once per token, upstream of every edited module, and shared by all of them:

- At the input of one decoder block (the *decision block*, before the first edited module) each token's
  hidden state h is normalised with per-dimension statistics of general text, z = (h − μ) / σ, scaled to
  unit length, and scored against the stored *mention keys*: s_t = max_i cos(z_t, k_i).
- The gate is sticky along the sequence: g_t = 1 if max_{s ≤ t} s_s > τ, else 0. A sequence's first token
  never counts: it is the attention sink, whose state is nearly the same whatever the token (with a key
  there every input would route on), so a key is never taken there either. A prompt that names an
  edited subject routes on from that name to its end (and through everything generated after it); a prompt
  that names none stays on the unedited model, bit for bit.
- Each edited module then answers y = where(g, u·W_live, u·W_base): W_live carries every committed edit.

Mention keys are the decision block's inputs at the tokens that name the fact: the last token of its
subject when the fact gives one and it is found in the prompt, else the prompt's *distinctive* tokens, those
whose best cosine with a bank of general-text tokens is below γ (names, numbers and rare words are; "What",
"is", "the", "?" are not). The decision block lies upstream of every edited module, so a key depends only on
the unedited model and the prompt: keys never drift as later edits land, and rebuilding them is exact.

Why per sequence and not per answer position: at the answer-predicting position a paraphrase and an
unrelated question of the same form look alike (bench/results/route_sweep.md: 13.6 % of unrelated positions
routed on at layer 20 for 63-99 % of paraphrase positions); the subject's own token is what they share.

Contract of `mention_routed(model, base, router)`:
- Inside the block the modules named in `base` answer as above; on exit (also after an exception) no hook
  registered here remains.
- A forward whose decision-block call has position ids starting at 0 in every row (or, without position ids,
  more than one token) starts new sequences; any other forward continues the previous one (decoding with a
  cache), carrying each row's running maximum.
- Keys added to the router inside the block act from the next forward on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editing.engine.deltas import parameter
from editing.engine.routing import KEY_BLOCK
from editing.errors import ModelMismatch
from editing.model.targets import resolve_modules


@dataclass(frozen=True)
class MentionConfig:
    """Where the gate is decided and how strictly.

    `block`: the decoder block whose input decides (e.g. "model.layers.18"), upstream of every edited module.
    `threshold`: τ on the best cosine. `distinct`: γ, the bank cosine below which a prompt token is a key.
    """

    block: str
    threshold: float = 0.75
    distinct: float = 0.6


@dataclass
class Normaliser:
    """Per-dimension mean and spread of general text at the decision block: z = (h − μ) / σ, unit length."""

    mean: torch.Tensor
    spread: torch.Tensor

    @classmethod
    def of(cls, hidden: torch.Tensor) -> Normaliser:
        """From general-text hidden states (N, d), N >= 2."""
        hidden = hidden.float()
        return cls(hidden.mean(0), hidden.std(0) + 1e-3)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        mean, spread = self.mean.to(hidden.device), self.spread.to(hidden.device)
        return F.normalize((hidden.float() - mean) / spread, dim=-1)


def best_cosine(unit: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(…,) the largest cosine of each unit row (…, d) with the unit keys (N, d); −1 without keys."""
    flat = unit.reshape(-1, unit.shape[-1])
    best = torch.full((flat.shape[0],), -1.0, device=flat.device)
    keys = keys.to(flat.device)
    for start in range(0, keys.shape[0], KEY_BLOCK):
        best = torch.maximum(best, (flat @ keys[start : start + KEY_BLOCK].T).amax(dim=-1))
    return best.reshape(unit.shape[:-1])


class MentionKeys:
    """Unit mention keys in blocks (one per `add`, e.g. per commit); `pop()` removes the last block."""

    def __init__(self) -> None:
        self._blocks: list[torch.Tensor] = []
        self._stacked: torch.Tensor | None = None

    def add(self, keys: torch.Tensor) -> None:
        self._blocks.append(F.normalize(keys.detach().float(), dim=-1))
        self._stacked = None

    def pop(self) -> torch.Tensor:
        block = self._blocks.pop()
        self._stacked = None
        return block

    def keys(self) -> torch.Tensor | None:
        if self._stacked is None and self._blocks:
            self._stacked = torch.cat(self._blocks)
        return self._stacked

    def count(self) -> int:
        return sum(int(b.shape[0]) for b in self._blocks)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)


@dataclass
class Router:
    """What `mention_routed` needs: the configuration, the normaliser, the general-text bank and the keys.

    `bank`: unit general-text vectors (normalised by `normaliser`) against which `mention_keys` judges a
    token distinctive.
    """

    config: MentionConfig
    normaliser: Normaliser
    bank: torch.Tensor
    keys: MentionKeys = field(default_factory=MentionKeys)


@dataclass(frozen=True)
class MentionSettings:
    """A method's routing, independent of the model: the decision block is `blocks_before` blocks before the
    first edited module's block (block 0 at the earliest); the normaliser and bank come from up to
    `bank_texts` general texts. Defaults chosen on the ZsRE training file (bench/results/mention_sweep_*.md)."""

    threshold: float = 0.7
    distinct: float = 0.7
    blocks_before: int = 2
    bank_texts: int = 1000


def decision_block_for(module_names: Sequence[str], blocks_before: int) -> str:
    """'model.layers.20.mlp.up_proj', … with 2 -> 'model.layers.18' (the earliest edited block, minus 2).

    Block 0 at the earliest (a model edited from its first block decides at that block's input).
    ModelMismatch when a name has no block index.
    """
    found = [re.match(r"^(.*?\.)(\d+)\.", name) for name in module_names]
    if not found or any(match is None for match in found):
        raise ModelMismatch(f"cannot find a block index in the edited modules {list(module_names)}")
    prefix, first = min(((m.group(1), int(m.group(2))) for m in found if m is not None), key=lambda p: p[1])
    return f"{prefix}{max(0, first - blocks_before)}"


def build_router(model: nn.Module, tokenizer: Any, module_names: Sequence[str], texts: Sequence[str], settings: MentionSettings) -> Router:
    """A router without keys for `model` (as it is now: call it on the unedited model), statistics from `texts`."""
    if len(texts) < 2:
        raise ValueError("the router's statistics need at least two general texts")
    block = decision_block_for(module_names, settings.blocks_before)
    hidden = torch.cat([h[1:] for h in block_inputs(model, tokenizer, block, list(texts)[: settings.bank_texts])])
    normaliser = Normaliser.of(hidden)
    return Router(MentionConfig(block, settings.threshold, settings.distinct), normaliser, normaliser(hidden))


@dataclass
class MentionStats:
    """Tokens routed on / seen, counted where `select` (B, T) is True (all without it)."""

    select: torch.Tensor | None = None
    on: int = 0
    seen: int = 0

    def record(self, gate: torch.Tensor) -> None:
        chosen = gate if self.select is None else gate[self.select.to(gate.device)]
        self.on += int(chosen.sum())
        self.seen += int(chosen.numel())


def decision_block(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` in `model`; ModelMismatch when there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelMismatch(f"the model has no module {name!r} to decide routing at") from None


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ModelMismatch("the decision block was called without a hidden-states tensor")
    return hidden


def _starts_sequences(hidden: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.numel():
        return bool((positions.reshape(positions.shape[0] if positions.dim() > 1 else 1, -1).amin(dim=-1) == 0).all())
    return int(hidden.shape[1]) > 1


class _Gate:
    """One routed block's state: the gate of the current forward and each row's running best score."""

    def __init__(self, router: Router, stats: MentionStats | None) -> None:
        self.router, self.stats = router, stats
        self.gate: torch.Tensor | None = None
        self.running: torch.Tensor | None = None

    def forget(self, *_: Any) -> None:
        # every forward starts at the embeddings: a gate left from the previous forward must never be used
        self.gate = None

    def decide(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = _block_input(args, kwargs)
        keys = self.router.keys.keys()
        if keys is None:
            score = torch.full(hidden.shape[:2], -1.0, device=hidden.device)
        else:
            score = best_cosine(self.router.normaliser(hidden), keys)
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.shape[-1] == score.shape[1]:
            # a sequence's first token is the attention sink: its state is nearly the same whatever the token
            score = score.masked_fill(positions.expand_as(score) == 0, -1.0)
        elif _starts_sequences(hidden, kwargs):
            score[:, 0] = -1.0
        previous = self.running
        if previous is not None and not _starts_sequences(hidden, kwargs) and previous.shape[0] == score.shape[0]:
            running = torch.cummax(torch.cat([previous.unsqueeze(1), score], dim=1), dim=1).values[:, 1:]
        else:
            running = torch.cummax(score, dim=1).values
        self.running = running[:, -1]
        self.gate = running > self.router.config.threshold
        if self.stats is not None:
            self.stats.record(self.gate)

    def module_hook(self, weight: torch.Tensor) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if self.gate is None:
                raise ModelMismatch("an edited module ran before the decision block: choose a block upstream of every edited module")
            if bool(self.gate.all()):
                return output
            off = F.linear(inputs[0], weight, getattr(module, "bias", None))
            return torch.where(self.gate.unsqueeze(-1), output, off)

        return hook


@contextmanager
def mention_routed(
    model: nn.Module, base: Mapping[str, torch.Tensor], router: Router, stats: MentionStats | None = None
) -> Iterator[None]:
    """Route the modules named in `base` by mentions (module docstring). ModelMismatch on a shape mismatch,
    a module that is not Linear, or a decision block that is not in the model."""
    modules = resolve_modules(model, list(base))
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise ModelMismatch(f"mention routing supports Linear modules only; {name} is {type(module).__name__}")
        if tuple(parameter(module).shape) != tuple(base[name].shape):
            raise ModelMismatch(f"base weight of {name} is {tuple(base[name].shape)}, the module's {tuple(parameter(module).shape)}")
    block = decision_block(model, router.config.block)
    gate = _Gate(router, stats)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, nn.Module):
        raise ModelMismatch("the model has no input embeddings module to start each forward at")
    handles = [
        embeddings.register_forward_pre_hook(gate.forget),
        block.register_forward_pre_hook(gate.decide, with_kwargs=True, prepend=True),
    ]
    handles += [module.register_forward_hook(gate.module_hook(base[name]), prepend=True) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Captured(Exception):
    """Raised by `block_inputs`' hook once it has the decision block's input: the rest of the forward is not needed."""


@torch.no_grad()
def block_inputs(model: nn.Module, tokenizer: Any, block_name: str, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Per prompt (tokenised with special tokens, alone): the decision block's input (T, d), float32.

    Each forward stops at the decision block (nothing after it runs), so this costs the blocks before it only.
    """
    block = decision_block(model, block_name)
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(_block_input(args, kwargs)[0].detach().float().cpu())
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            with suppress(_Captured):
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        handle.remove()
    return seen


def subject_token(tokenizer: Any, prompt: str, subject: str | None) -> int | None:
    """Index of the subject's last token in the prompt's ids (special tokens included); None if not found."""
    if not subject or subject not in prompt:
        return None
    end = prompt.rindex(subject) + len(subject)
    encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    last = None
    for index, (start, stop) in enumerate(encoded["offset_mapping"]):
        if start < stop <= end:
            last = index
    return last


def mention_keys(
    model: nn.Module,
    tokenizer: Any,
    router: Router,
    prompts: Sequence[str],
    subjects: Sequence[str | None],
) -> torch.Tensor:
    """The unit mention keys (n, d) of the facts: per fact its subject's last token, else its distinctive tokens
    (at least one: the prompt's last token when none is distinctive)."""
    rows = block_inputs(model, tokenizer, router.config.block, prompts)
    keys: list[torch.Tensor] = []
    for hidden, prompt, subject in zip(rows, prompts, subjects, strict=True):
        unit = router.normaliser(hidden)
        index = subject_token(tokenizer, prompt, subject)
        if index is not None and unit.shape[0] > 1:
            # never the first token (the attention sink, which the gate ignores): the one after it instead
            index = max(index, 1)
            keys.append(unit[index : index + 1])
            continue
        # never the first token: the attention sink, whose state hardly depends on the token
        distinct = best_cosine(unit[1:], router.bank) < router.config.distinct
        chosen = unit[1:][distinct]
        keys.append(chosen if chosen.shape[0] else unit[-1:])
    return torch.cat(keys)


__all__ = [
    "MentionConfig",
    "MentionKeys",
    "MentionSettings",
    "MentionStats",
    "Normaliser",
    "Router",
    "block_inputs",
    "build_router",
    "decision_block_for",
    "mention_keys",
    "mention_routed",
    "subject_token",
]
