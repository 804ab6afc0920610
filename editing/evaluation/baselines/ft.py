"""FT-L: constrained fine-tuning of the edited modules, the simplest baseline an editor must beat.

As in the ROME/EasyEdit FT-L baseline: a few Adam steps on the edit loss (mean cross-entropy of the
new targets, teacher-forced, spec §1.1 tokenisation), and after every step each weight's change is
clamped into an L-inf ball of radius `norm_constraint` around its value before the edit.

The weights are never written: the forward passes run through `torch.func.functional_call` with
W + ΔW substituted for the edited weights, and only ΔW (float32, (in, out) convention as
`editing.model.targets.weight_in_out`) is trained. `propose` therefore leaves the model bit-identical and
returns the ΔW as an `EditPlan`, which the caller applies with `editing.engine.deltas.apply` like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from editing.data import EditExample
from editing.engine.deltas import EditPlan, StepDiagnostics
from editing.model.targets import resolve_modules, weight_in_out
from editing.model.tokenise import IGNORE_INDEX, TokenBatch, tokenise


@dataclass(frozen=True)
class FTConfig:
    """Hyper-parameters of FT-L (defaults: EasyEdit's FT-L for GPT-2 XL / Llama, 25 steps of Adam)."""

    steps: int = 25  # Adam steps at most
    lr: float = 5e-4
    norm_constraint: float | None = 5e-4  # L-inf radius of each weight's change; None: unconstrained
    weight_decay: float = 0.0
    early_stop_loss: float = 1e-2  # stop once the edit loss is below this (ROME's FT does the same)
    lm_batch_size: int = 16  # rows per forward pass; gradients are accumulated over the whole batch

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.lm_batch_size < 1:
            raise ValueError(f"FTConfig needs steps >= 1, lr > 0 and lm_batch_size >= 1, got {self}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError(f"FTConfig.norm_constraint must be positive or None, got {self.norm_constraint}")


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Switch gradients off on every model parameter for the duration, so no `.grad` is left behind."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def _as_weight(module: nn.Module, in_out: torch.Tensor) -> torch.Tensor:
    """`in_out` laid out like the module's own weight, in its dtype.

    `weight_in_out` returns the weight itself when it is already (in, out) (Conv1D) and a transposed
    view otherwise (Linear), so the same test decides whether to transpose back.
    """
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    stored = in_out if weight_in_out(module) is weight else in_out.t()
    return stored.to(weight.dtype)


class FTEditor:
    """FT-L for the named Linear/Conv1D modules of `model`: `propose(examples)` -> `EditPlan`."""

    def __init__(self, model: nn.Module, tokenizer: Any, module_names: Sequence[str], config: FTConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.modules = resolve_modules(model, list(module_names))
        self.config = config or FTConfig()

    def _loss(self, batch: TokenBatch, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.model.get_input_embeddings().weight.device  # type: ignore[operator]
        out = functional_call(
            self.model,
            weights,
            args=(),
            kwargs={"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)},
        )
        labels = batch.labels.to(device)
        selected = labels != IGNORE_INDEX
        return F.cross_entropy(out.logits[selected].float(), labels[selected])

    def _step_loss(self, batch: TokenBatch, bases: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> float:
        """Forward and backward the edit loss (mean over LM mini-batches) through W + ΔW; returns the loss."""
        size = self.config.lm_batch_size
        chunks = math.ceil(len(batch) / size)
        total = 0.0
        for start in range(0, len(batch), size):
            chunk = TokenBatch(
                *(t[start : start + size] for t in (batch.input_ids, batch.attention_mask, batch.labels))
            )
            weights = {
                f"{name}.weight": _as_weight(module, bases[name] + deltas[name])
                for name, module in self.modules.items()
            }
            loss = self._loss(chunk, weights) / chunks
            loss.backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
        return total

    def propose(self, examples: Sequence[EditExample], masters: dict[str, torch.Tensor] | None = None) -> EditPlan:
        """Fine-tune ΔW on `examples` and return it; the model is bit-identical afterwards.

        `masters` (float32 (in, out) copies of the current weights, for low-precision models) are
        the starting weights when given; they are read, never changed.
        """
        cfg = self.config
        batch = tokenise(self.tokenizer, [e.prompt for e in examples], [e.target_new for e in examples])
        bases = {
            name: (masters[name] if masters else weight_in_out(m)).detach().float() for name, m in self.modules.items()
        }
        deltas = {name: torch.zeros_like(base, requires_grad=True) for name, base in bases.items()}
        optimiser = torch.optim.Adam(list(deltas.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        diagnostics: list[StepDiagnostics] = []
        rows = int(batch.answer_mask.sum())
        with torch.enable_grad(), _frozen(self.model):
            for step in range(1, cfg.steps + 1):
                optimiser.zero_grad(set_to_none=True)
                loss = self._step_loss(batch, bases, deltas)
                if loss < cfg.early_stop_loss:
                    break
                optimiser.step()
                if cfg.norm_constraint is not None:
                    with torch.no_grad():
                        for delta in deltas.values():
                            delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
                norm = float(sum(float(d.detach().square().sum()) for d in deltas.values()) ** 0.5)
                diagnostics.append(StepDiagnostics(step, loss, rows, norm))
        return EditPlan({name: delta.detach().clone() for name, delta in deltas.items()}, tuple(diagnostics))
