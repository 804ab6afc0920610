"""The EMSEdit editor: multi-step hypernetwork editing (MSBP) of a live language model (spec §6.2).

For an edit batch and s = 1..S: capture keys u and output gradients δ of the edited modules at the
answer-predicting positions on the *current* weights (after ΔW_1..ΔW_{s-1}), map them through the
step's hypernetwork to value changes, aggregate them with the ridge solve into ΔW_s, and apply ΔW_s.

Contracts:
- `propose(examples)` returns an `EditPlan` (ΔW = Σ_s ΔW_s per module, float32, (in, out)) and leaves
  the model bit-identical and the editor state unchanged. The editor state an edit produces (the
  normaliser statistics, when not frozen, and with `preserve_edits` the edit memory, editing/engine/edit_memory.py)
  travels in `plan.editor_state`; `adopt_state(plan)` makes it current once the caller commits the edit,
  and `load_edit_state` puts any recorded state back (exact revert).
- Applying and restoring weights are `editing.engine.deltas.apply` / `restore`, explicit and separate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.deltas import (
    EditPlan,
    StepDiagnostics,
    add_deltas,
    apply,
    master_copies,
    parameter,
    restore,
    snapshot,
)
from editing.engine.edit_memory import is_memory_key, memory, remember
from editing.engine.hypernet import EditorNets
from editing.engine.solve import key_prior, ridge_solve
from editing.errors import EditingError
from editing.model.targets import resolve_modules, weight_in_out
from editing.model.tokenise import TokenBatch, tokenise
from editing.model.tracing import Trace, trace_modules

Captures = dict[str, tuple[torch.Tensor, torch.Tensor]]
Deltas = dict[str, torch.Tensor]


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embeddings (works with a device_map too)."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return torch.device(embeddings.weight.device)


def split_batch(batch: TokenBatch, size: int) -> Iterator[TokenBatch]:
    """Consecutive row chunks of at most `size`, with all-padding trailing columns cut off."""
    for start in range(0, batch.input_ids.shape[0], size):
        mask = batch.attention_mask[start : start + size]
        width = int(mask.sum(-1).max())
        yield TokenBatch(
            input_ids=batch.input_ids[start : start + size, :width],
            attention_mask=mask[:, :width],
            labels=batch.labels[start : start + size, :width],
            strengths=batch.strengths[start : start + size] if batch.strengths is not None else None,
        )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with a label (labels are pre-shifted; never shift again)."""
    selected = labels != -100
    return F.cross_entropy(logits[selected].float(), labels[selected])


def fact_loss(logits: torch.Tensor, labels: torch.Tensor, strengths: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over rows of each row's mean cross-entropy over its labelled positions (times its strength).

    The edit signal: every fact weighs the same whatever its answer length and, unlike the batch mean,
    whatever else is in the batch, so the δ a fact produces does not grow when it is edited alone or in a
    small batch (the gate's bisection and retries edit subsets; a batch mean made a single fact's δ about
    B times larger than in the batch of B it was trained and calibrated on).
    """
    selected = labels != -100
    ce = F.cross_entropy(logits[selected].float(), labels[selected], reduction="none")
    row_of_position = selected.nonzero()[:, 0]  # same row-major order as logits[selected]
    counts = selected.sum(1).clamp(min=1).to(ce.dtype)
    weights = 1.0 / counts
    if strengths is not None:  # a stronger edit signal for chosen facts (the gate's efficacy retries)
        weights = weights * strengths.to(device=ce.device, dtype=ce.dtype)
    return (ce * weights[row_of_position]).sum()


def project_out(keys: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`keys` (N, d) with their component along `direction` (d,) removed (unchanged if it is ~0).

    Solving on the projected keys puts every row of ΔW orthogonal to `direction`, so ΔW leaves the
    module's response to it unchanged while the edit keys, whose projected parts carry the edit, still
    get their values.
    """
    norm = direction.norm()
    if float(norm) < 1e-12:
        return keys
    unit = (direction / norm).to(keys.dtype)
    projected: torch.Tensor = keys - (keys @ unit)[:, None] * unit[None, :]
    return projected


def lm_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Logits (B, T, V) of a batch; labels are never passed to the model (it would shift them)."""
    device = input_device(model)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    logits: torch.Tensor = out.logits
    return logits


def traced_loss_passes(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batch: TokenBatch,
    lm_batch_size: int,
    *,
    weight_grads: bool,
    scale: float = 1.0,
    per_fact: bool = False,
) -> tuple[Trace, float]:
    """Forward and backward the answer loss per LM mini-batch; returns the trace and the loss.

    The loss is one token mean per LM mini-batch (`answer_loss`; the returned loss is their sum) or,
    with `per_fact`, `fact_loss` (the returned loss is then the mean per fact). The trace holds (u, δ)
    at the answer-predicting positions and, with `weight_grads`, ∂(scale · Σ_mb loss)/∂W. The returned
    loss is unscaled.
    """
    total = 0.0
    with torch.enable_grad(), trace_modules(modules, weight_grads=weight_grads) as trace:
        for chunk in split_batch(batch, lm_batch_size):
            trace.select = chunk.labels != -100
            logits = lm_logits(model, chunk)  # on the last device of a device_map, not the input's
            labels = chunk.labels.to(logits.device)
            loss = fact_loss(logits, labels, chunk.strengths) if per_fact else answer_loss(logits, labels)
            (loss * scale).backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
    return trace, total / max(1, len(batch)) if per_fact else total


@dataclass(frozen=True)
class StepRecord:
    """One executed editing step: what was captured and the ΔW it produced (hypernet device, float32)."""

    captures: Captures
    deltas: Deltas
    diagnostics: StepDiagnostics


class EMSEditor:
    """Hypernetwork editor for the named Linear/Conv1D modules of `model` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        module_names: Sequence[str],
        config: EditorConfig,
        nets: EditorNets | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.modules = resolve_modules(model, list(module_names))
        shapes = {name: (int(w.shape[0]), int(w.shape[1])) for name, w in self._weights().items()}
        if nets is None:
            nets = EditorNets(shapes, config.steps, config.rank, config.n_blocks, config.edit_lr, config.mode == "batch")
        elif set(nets.index) != set(shapes):
            raise ValueError("the hypernetworks were built for other modules than the ones given")
        first = parameter(next(iter(self.modules.values()))).device
        self.device = torch.device(config.hypernet_device) if config.hypernet_device else first
        self.nets = nets.to(self.device)
        # C = E[uuᵀ] per module for `config.key_covariance` (editing/engine/key_covariance.py); set by training or a checkpoint
        self.key_moments: dict[str, torch.Tensor] = {}
        # the edit memory of `config.preserve_edits` (editing/engine/edit_memory.py): part of the edit state
        self._memory_state: dict[str, torch.Tensor] = {}
        self._memory_priors: dict[str, torch.Tensor] = {}  # module -> G as float32 on self.device

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def steps(self) -> int:
        return self.nets.steps

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: weight_in_out(module) for name, module in self.modules.items()}

    def set_key_moments(self, moments: dict[str, torch.Tensor]) -> None:
        """Use `moments` (module -> E[uuᵀ], (d_in, d_in)) for the key covariance term; ValueError if they do not fit."""
        shapes = {name: int(w.shape[0]) for name, w in self._weights().items()}
        if set(moments) != set(shapes):
            raise ValueError(
                f"key statistics are for modules {sorted(moments)}, the editor edits {sorted(shapes)}"
            )
        for name, moment in moments.items():
            if tuple(moment.shape) != (shapes[name], shapes[name]):
                raise ValueError(f"key statistics of {name} have shape {tuple(moment.shape)}, expected {(shapes[name],) * 2}")
        self.key_moments = {name: m.to(self.device, torch.float32) for name, m in moments.items()}

    def tokenise(self, examples: Sequence[EditExample]) -> TokenBatch:
        """The edit batch: each example's prompt teacher-forced on its new target."""
        return tokenise(self.tokenizer, [e.prompt for e in examples], [e.target_new for e in examples])

    def capture(self, batch: TokenBatch) -> tuple[Captures, float]:
        """(K, D) per module at the answer-predicting positions on the current weights, and the edit loss.

        δ comes from `fact_loss`, so a fact's rows are the same whether it is edited alone or in a batch;
        the loss returned is the mean cross-entropy per fact.
        """
        trace, loss = traced_loss_passes(
            self.model, self.modules, batch, self.config.lm_batch_size, weight_grads=False, per_fact=True
        )
        captures: Captures = {}
        for name in self.modules:
            keys, grads = trace.stacked(name)
            captures[name] = (keys.to(self.device), grads.to(self.device))
        return captures, loss

    def update_normalisers(self, step: int, captures: Captures) -> None:
        """Merge the captured rows [u; δ] into the running statistics of the step's networks."""
        for name, (keys, grads) in captures.items():
            net, _ = self.nets.net(step, name)
            net.normaliser.update(torch.cat([keys, grads], dim=-1))

    def module_delta(self, step: int, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """ΔW (d_in, d_out) of one module at one step; differentiable in the hypernetwork's parameters."""
        net, idx = self.nets.net(step, name)
        values = net.values(keys, grads, idx)
        prior = None
        stats = net.normaliser
        if self.config.preserve_keys > 0:
            prior = key_prior(stats.mean[: net.key_size], stats.var[: net.key_size], self.config.preserve_keys)
        if self.config.key_covariance > 0:
            if name not in self.key_moments:
                raise EditingError(
                    "[editor] key_covariance is set but this editor has no key statistics: train it with "
                    "key_covariance > 0 (python -m editing.train --key-covariance G) or set key_covariance = 0"
                )
            covariance = self.config.key_covariance * self.key_moments[name]
            prior = covariance if prior is None else prior + covariance
        if self.config.preserve_edits > 0 and name in self._memory_priors:
            earlier = self.config.preserve_edits * self._memory_priors[name]
            prior = earlier if prior is None else prior + earlier
        if self.config.project_out_mean_key:
            keys = project_out(keys, stats.mean[: net.key_size])
        return ridge_solve(keys, values, net.ridge(idx), self.config.solve_form, prior)

    def hyper_backward(self, step: int, captures: Captures, weight_grads: Deltas) -> None:
        """Accumulate into the step's hypernetwork gradients ∂L/∂θ = Σ_l ⟨G_l, ∂ΔW_l/∂θ⟩ (spec §4.3).

        `weight_grads` maps each module to G_l = ∂L/∂W_l (in, out) at the edited weights; the captured
        (K, D) are constants (first-order MSBP: the same G serves every step, §6.5).
        """
        surrogate = torch.zeros((), device=self.device)
        for name, (keys, grads) in captures.items():
            grad = weight_grads.get(name)
            if grad is None:
                continue
            delta = self.module_delta(step, name, keys, grads)
            surrogate = surrogate + (delta * grad.to(self.device, torch.float32)).sum()
        if surrogate.requires_grad:
            surrogate.backward()  # type: ignore[no-untyped-call]

    def step_deltas(self, step: int, captures: Captures) -> Deltas:
        """ΔW of every module at one step, without gradients."""
        with torch.no_grad():
            return {name: self.module_delta(step, name, keys, grads) for name, (keys, grads) in captures.items()}

    def run_step(
        self, step: int, batch: TokenBatch, masters: dict[str, torch.Tensor], *, update_normaliser: bool
    ) -> StepRecord:
        """Capture on the current weights, compute ΔW_step and apply it in place (masters updated too).

        The caller owns undoing it (keep the snapshot of the first step).
        """
        captures, loss = self.capture(batch)
        if update_normaliser:
            self.update_normalisers(step, captures)
        deltas = self.step_deltas(step, captures)
        apply(self.model, deltas, masters)
        rows = next(iter(captures.values()))[0].shape[0]
        norm = float(sum(float(d.square().sum()) for d in deltas.values()) ** 0.5)
        return StepRecord(captures, deltas, StepDiagnostics(step, loss, rows, norm))

    def propose(
        self,
        examples: Sequence[EditExample],
        masters: dict[str, torch.Tensor] | None = None,
        *,
        strengths: Sequence[float] | None = None,
    ) -> EditPlan:
        """Compute the S-step edit of `examples` on the current weights.

        `strengths` (one per example, default 1) weight each fact's loss and so its edit signal: the
        gate edits a fact that failed efficacy again with a larger one.

        Invariant: the model's weights are bit-identical before and after, and the editor's state
        (normaliser statistics) is unchanged; the state the edit produced is in `plan.editor_state`.
        `masters` (float32 (in, out) copies of the current weights) are read, never changed.
        """
        batch = self.tokenise(examples)
        if strengths is not None:
            if len(strengths) != len(examples):
                raise ValueError(f"{len(strengths)} strengths for {len(examples)} examples")
            batch.strengths = torch.tensor([float(s) for s in strengths], dtype=torch.float32)
        state_before = self.nets.normaliser_state()
        work = {name: t.clone() for name, t in masters.items()} if masters else master_copies(self.model, self.module_names)
        saved = snapshot(self.model, self.module_names)
        records: list[StepRecord] = []
        try:
            for step in range(1, self.steps + 1):
                records.append(self.run_step(step, batch, work, update_normaliser=not self.config.freeze_normaliser))
        finally:
            restore(self.model, saved)
            state_after = self.nets.normaliser_state()
            self.nets.load_normaliser_state(state_before)
        state_after |= self.remembered(records)
        total: Deltas = {}
        for record in records:
            total = add_deltas(total, record.deltas)
        deltas = {name: total[name].to(weight_in_out(m).device) for name, m in self.modules.items()}
        return EditPlan(deltas, tuple(r.diagnostics for r in records), state_after)

    def remembered(self, records: Sequence[StepRecord]) -> dict[str, torch.Tensor]:
        """The edit memory after an edit whose steps are `records`: grown by the last step's keys when
        `preserve_edits` is on, the current one otherwise (a memory kept while the option is off stays)."""
        if self.config.preserve_edits <= 0 or not records:
            return {key: value.clone() for key, value in self._memory_state.items()}
        return remember(self._memory_state, {name: keys for name, (keys, _) in records[-1].captures.items()})

    def adopt_state(self, plan: EditPlan) -> None:
        """Make the editor state of a committed plan the editor's current state."""
        if plan.editor_state:
            self.load_edit_state(plan.editor_state)

    def edit_state(self) -> dict[str, torch.Tensor]:
        """Copies of what an edit changes: the running statistics and the edit memory; see `load_edit_state`."""
        return self.nets.normaliser_state() | {key: value.clone() for key, value in self._memory_state.items()}

    def load_edit_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the running statistics and the edit memory exactly (e.g. to revert to a recorded version).

        KeyError for a state of other networks; a state without edit memory empties it.
        """
        self.nets.load_normaliser_state({key: value for key, value in state.items() if not is_memory_key(key)})
        self.set_edit_memory(state)

    def set_edit_memory(self, state: dict[str, torch.Tensor]) -> None:
        """Make the edit-memory entries of `state` the current memory (others are ignored; none empties it)."""
        self._memory_state = {key: value.clone() for key, value in state.items() if is_memory_key(key)}
        self._memory_priors = {name: gram.to(self.device, torch.float32) for name, gram in memory(state).items()}

