"""Routed edits: a committed edit acts only on the tokens whose key matches a key stored for the edits.

For each routed module, with base weight W_base (the unedited model's) and live weight W_live (the model
as edited; ΔW = W_live − W_base is everything committed so far), the output for a token whose input is u is

    y(u) = u·W_base + g(u)·u·ΔW,      g(u) = 1 if max_i cos(u, k_i) > τ else 0   (per token),

where k_i are the stored keys of that module (`KeyStore`). A soft variant replaces the step by
σ((max_i cos(u, k_i) − τ) / temperature). A token far from every edit's keys sees the unedited module, one
that matches an edit's key sees the edited one: the idea of WISE's and GRACE's routers, with the edit
memory's keys (the inputs of the edited modules at the answer-predicting positions of the edits' prompts) as
the codebook.

Contract of `routed(model, base, store, config)`:
- Inside the block the modules named in `base` answer as above; on exit (also after an exception) no hook
  registered here remains. Nothing is stored on modules or parameters.
- With the hard gate the output is computed as `where(g, y_live, y_base)`, y_live being what the module
  computes from its live weights and y_base the same computation with the base weights: a token switched
  off gets exactly the unedited module's output, one switched on exactly the edited module's (a threshold
  above 1 gives the base model, bit for bit; −1, with at least one stored key, the edited model).
- ΔW is implicit (W_live − W_base): whatever is on the live weights is routed, an edit being computed
  included. The store is read at every forward, so keys added inside the block (a commit) act at once.
- The hook runs before any other forward hook of the module (`prepend`), so a trace taken inside the block
  (`editing.model.tracing`) records the routed output and its gradient.
- A module without stored keys routes every token off.

Cost per token and routed module: one product with the key matrix (N_keys × d_in multiply-adds) and one
with the base weight (d_in × d_out), beside the module's own product; the key product grows with every
commit. Memory: the base weight (the module's dtype) and 4·d_in bytes per stored key (SmolLM2-135M's
up_proj: 2,304 bytes per key and module, about 14 KB per answer-predicting position over its 6 modules).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editing.engine.deltas import parameter
from editing.engine.edit_memory import exponent_key, rows_key
from editing.errors import ModelMismatch
from editing.model.targets import resolve_modules
from editing.model.tokenise import tokenise
from editing.model.tracing import trace_modules

#: keys compared with the tokens in blocks of this many, so the (tokens × keys) similarities stay small
KEY_BLOCK = 8192


@dataclass(frozen=True)
class RouteConfig:
    """The gate: `threshold` τ on the best cosine; `temperature` > 0 makes it soft (σ((cos − τ)/T))."""

    threshold: float
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"the soft gate's temperature must be positive, got {self.temperature}")


class KeyStore:
    """Unit-normalised float32 keys per module, in blocks (one per `add`, e.g. per commit).

    `pop()` removes the last block (a provisional one, or a reverted commit's keys).
    """

    def __init__(self) -> None:
        self._blocks: list[dict[str, torch.Tensor]] = []
        self._stacked: dict[str, torch.Tensor] = {}

    def add(self, keys: Mapping[str, torch.Tensor]) -> None:
        """Append one block: module -> keys (rows, d_in), any float dtype; rows of zeros stay zero."""
        self._blocks.append({name: F.normalize(k.detach().float(), dim=-1) for name, k in keys.items()})
        self._stacked = {}

    def pop(self) -> dict[str, torch.Tensor]:
        """Remove and return the last block; IndexError when the store is empty."""
        block = self._blocks.pop()
        self._stacked = {}
        return block

    def keys(self, module: str) -> torch.Tensor | None:
        """(N, d_in) every stored key of `module`, or None when there is none."""
        if module not in self._stacked:
            parts = [block[module] for block in self._blocks if module in block and block[module].shape[0]]
            if not parts:
                return None
            self._stacked[module] = torch.cat(parts)
        return self._stacked[module]

    def count(self, module: str) -> int:
        """How many keys `module` has."""
        return sum(int(block[module].shape[0]) for block in self._blocks if module in block)

    def nbytes(self) -> int:
        """Bytes held by the keys (float32)."""
        return sum(t.numel() * t.element_size() for block in self._blocks for t in block.values())

    def __len__(self) -> int:
        return len(self._blocks)


@dataclass
class RouteStats:
    """Per module: tokens routed on and tokens seen, counted where `select` (B, T) is True (all without it).

    Set `select` before each forward pass, as `editing.model.tracing.Trace.select`.
    """

    select: torch.Tensor | None = None
    on: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def record(self, module: str, gate: torch.Tensor) -> None:
        chosen = gate if self.select is None else gate[self.select.to(gate.device)]
        self.on[module] = self.on.get(module, 0) + int((chosen > 0.5).sum())
        self.seen[module] = self.seen.get(module, 0) + int(chosen.numel())

    def shares(self) -> dict[str, float]:
        """module -> share of the counted tokens routed on (soft gates count as on above 0.5)."""
        return {name: self.on[name] / self.seen[name] for name in self.seen if self.seen[name]}


def best_cosine(inputs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(…,) the largest cosine of each input row (…, d) with the unit keys (N, d), in float32."""
    flat = F.normalize(inputs.detach().reshape(-1, inputs.shape[-1]).float(), dim=-1)
    keys = keys.to(flat.device)
    best = torch.full((flat.shape[0],), -torch.inf, device=flat.device)
    for start in range(0, keys.shape[0], KEY_BLOCK):
        best = torch.maximum(best, (flat @ keys[start : start + KEY_BLOCK].T).amax(dim=-1))
    return best.reshape(inputs.shape[:-1])


def _module_output(module: nn.Module, weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """What `module` computes from `inputs` with `weight` in place of its own (the same kernels, so the same bits)."""
    if isinstance(module, nn.Linear):
        return F.linear(inputs, weight, module.bias)
    bias = getattr(module, "bias", None)
    if hasattr(module, "nf") and isinstance(bias, torch.Tensor):  # transformers' Conv1D: W (in, out), addmm(b, x, W)
        flat = torch.addmm(bias, inputs.reshape(-1, inputs.shape[-1]), weight)
        return flat.reshape(*inputs.shape[:-1], weight.shape[-1])
    raise ModelMismatch(f"cannot route {type(module).__name__}: only Linear and Conv1D modules are supported")


def _gate(inputs: torch.Tensor, keys: torch.Tensor | None, config: RouteConfig) -> torch.Tensor:
    """(B, T) gate values in [0, 1] (float32); all 0 without keys."""
    if keys is None:
        return torch.zeros(inputs.shape[:-1], device=inputs.device)
    best = best_cosine(inputs, keys)
    if config.temperature is None:
        return (best > config.threshold).float()
    return torch.sigmoid((best - config.threshold) / config.temperature)


def _make_hook(name: str, base: torch.Tensor, store: KeyStore, config: RouteConfig, stats: RouteStats | None) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        u = inputs[0]
        gate = _gate(u, store.keys(name), config)
        if stats is not None:
            stats.record(name, gate)
        off = _module_output(module, base, u)
        weight = gate.to(output.dtype).unsqueeze(-1)
        if config.temperature is None:
            return torch.where(weight > 0, output, off)
        return off + weight * (output - off)

    return hook


def base_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named modules' weights as stored (dtype and layout): the `base` of `routed`."""
    return {name: parameter(module).detach().clone() for name, module in resolve_modules(model, list(names)).items()}


@contextmanager
def routed(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    store: KeyStore,
    config: RouteConfig,
    stats: RouteStats | None = None,
) -> Iterator[RouteStats | None]:
    """Route the modules named in `base` (see the module docstring); `stats`, when given, counts the gates.

    ModelMismatch when a base weight does not have its module's shape.
    """
    modules = resolve_modules(model, list(base))
    for name, module in modules.items():
        shape = tuple(parameter(module).shape)
        if shape != tuple(base[name].shape):
            raise ModelMismatch(f"base weight of {name} is {tuple(base[name].shape)}, the module's {shape}")
    handles = [
        module.register_forward_hook(_make_hook(name, base[name], store, config, stats), prepend=True)
        for name, module in modules.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def state_keys(editor_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The last edit's keys per module (float32) from an editor state with the edit memory on.

    They are the inputs at the answer-predicting positions of the edit's last step (editing/engine/edit_memory.py),
    stored as int16 with a power-of-two exponent; empty when the edit remembered nothing (`preserve_edits` 0).
    """
    out: dict[str, torch.Tensor] = {}
    prefix = rows_key("")
    for key, rows in editor_state.items():
        if key.startswith(prefix):
            module = key[len(prefix) :]
            out[module] = rows.float() * 2.0 ** int(editor_state[exponent_key(module)])
    return out


@torch.no_grad()
def answer_keys(
    model: nn.Module,
    tokenizer: Any,
    module_names: Sequence[str],
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """The inputs (float32, (positions, d_in)) of the named modules at the answer-predicting positions of the
    prompts teacher-forced on the answers, on the model as it answers now (inside `routed`: the routed model)."""
    modules = resolve_modules(model, list(module_names))
    device = next(model.parameters()).device
    with trace_modules(modules) as trace:
        for start in range(0, len(prompts), batch_size):
            batch = tokenise(tokenizer, prompts[start : start + batch_size], answers[start : start + batch_size])
            trace.select = batch.answer_mask
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return {name: torch.cat(trace.keys[name]) for name in modules}
