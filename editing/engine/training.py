"""Meta-training of the editor's hypernetworks (spec §5, §6.6, §6.7, §7.1), sequential and batch modes.

One loop covers the variants the evaluation compares: EMSEdit (S steps, L2 penalty), MALMEN
(S = 1, batch mode, KL locality), RLEdit-style (S = 1, sequential, KL locality, backtracking) and
the quirks of the reference code, each a named option of `TrainingOptions`:

- `single_adam_step`: one optimiser step per epoch after accumulating (and re-clipping) the gradients of
  the whole sequence (EMS `train_seq`, RLEdit); otherwise one step per training batch.
- `squared_l2_coef`: the L2 coefficient applied twice (η², 0.25 for η = 0.5) as EMS `train_seq` does.
- `l2_on_drift`: penalise the cumulative drift W − W0 instead of this batch's ΔW.
- `duplicate_params`: batch mode lists the shared network once per step in Adam, so every `step()`
  makes S updates; replicated by stepping S times.
- `revert_between_steps`: batch mode reverts the LM to W0 after each training step, so step s ≥ 2 is
  trained on W0 while at edit time it runs on W0 + ΔW_1 (the train/test mismatch).
The never-frozen normaliser is `EditorConfig.freeze_normaliser` (edit time); in training the statistics
are always updated, as in the reference.

The LM weights are changed during training and restored bit-exactly at the end of every epoch.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from editing.data import EditExample
from editing.engine.deltas import apply, master_copies, restore, snapshot
from editing.engine.emsedit import (
    Deltas,
    EMSEditor,
    StepRecord,
    input_device,
    lm_logits,
    split_batch,
    traced_loss_passes,
)
from editing.engine.key_covariance import key_second_moments, reference_texts
from editing.model.tokenise import TokenBatch, tokenise
from editing.model.tracing import trace_modules

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOptions:
    """Everything the meta-training loop can vary (the editor's shape comes from its EditorConfig)."""

    n_batches: int = 32  # training edit batches per epoch (0: all the data allows)
    batch_size: int = 16  # facts per training edit batch
    epochs: int = 1
    meta_lr: float = 1e-5
    max_grad_norm: float = 1.0
    l2_coef: float = 0.5
    locality: Literal["none", "kl"] = "none"
    loc_coef: float = 1.0
    back_depth: int = 1  # paraphrase/locality batches in the loss: this one and back_depth - 1 earlier ones
    back_decay: float = 0.95  # weight μ^k of the batch k positions back
    reset_every: int = 0  # sequential mode: reset the LM to W0 every this many batches (0: never)
    single_adam_step: bool = True
    squared_l2_coef: bool = True
    l2_on_drift: bool = True
    duplicate_params: bool = False
    revert_between_steps: bool = True
    seed: int = 0


@dataclass
class TrainingReport:
    """Per-batch numbers of a training run (edit loss before editing, paraphrase loss after)."""

    edit_losses: list[float] = field(default_factory=list)
    paraphrase_losses: list[float] = field(default_factory=list)
    seconds_per_batch: list[float] = field(default_factory=list)
    optimiser_steps: int = 0


@dataclass(frozen=True)
class _Batch:
    edit: TokenBatch
    paraphrase: TokenBatch
    locality: TokenBatch | None


def make_batches(
    editor: EMSEditor, examples: Sequence[EditExample], options: TrainingOptions
) -> list[_Batch]:
    """Shuffle (seeded) and cut the examples into tokenised training batches of `batch_size` facts."""
    order = list(examples)
    random.Random(options.seed).shuffle(order)
    count = len(order) // options.batch_size
    if options.n_batches:
        count = min(count, options.n_batches)
    if count == 0:
        raise ValueError(f"{len(order)} examples are fewer than one training batch of {options.batch_size}")
    batches = []
    for i in range(count):
        chunk = order[i * options.batch_size : (i + 1) * options.batch_size]
        paraphrases = [e.rephrase_prompts[0] if e.rephrase_prompts else e.prompt for e in chunk]
        para = tokenise(editor.tokenizer, paraphrases, [e.target_new for e in chunk])
        loc_pairs = [e.locality[0] for e in chunk if e.locality]
        locality = None
        if options.locality == "kl" and loc_pairs:
            locality = tokenise(editor.tokenizer, [p for p, _ in loc_pairs], [a for _, a in loc_pairs])
        batches.append(_Batch(editor.tokenise(chunk), para, locality))
    return batches


def reference_log_probs(editor: EMSEditor, batch: TokenBatch) -> list[torch.Tensor]:
    """Log-probabilities at the answer rows per LM mini-batch, on the current weights (no grad)."""
    out = []
    with torch.no_grad():
        for chunk in split_batch(batch, editor.config.lm_batch_size):
            logits = lm_logits(editor.model, chunk)
            out.append(F.log_softmax(logits[chunk.labels.to(logits.device) != -100].float(), -1))
    return out


def kl_weight_grads(editor: EMSEditor, batch: TokenBatch, reference: list[torch.Tensor], scale: float) -> Deltas:
    """∂(scale · Σ_mb KL(p_ref ‖ p_current))/∂W on the answer rows (MALMEN's locality loss)."""
    with torch.enable_grad(), trace_modules(editor.modules, weight_grads=True) as trace:
        for chunk, ref in zip(split_batch(batch, editor.config.lm_batch_size), reference, strict=True):
            logits = lm_logits(editor.model, chunk)
            post = F.log_softmax(logits[chunk.labels.to(logits.device) != -100].float(), -1)
            kl = F.kl_div(post, ref, log_target=True, reduction="batchmean")
            (kl * scale).backward()  # type: ignore[no-untyped-call]
    return trace.weight_grads


def _accumulate(total: Deltas, more: Deltas) -> None:
    for name, grad in more.items():
        total[name] = total[name] + grad.to(total[name].device) if name in total else grad


class MetaTrainer:
    """Trains `editor.nets` on edit examples with the options above (see the module docstring)."""

    def __init__(
        self, editor: EMSEditor, options: TrainingOptions, on_batch: Callable[[int, int, float], None] | None = None
    ) -> None:
        self.editor = editor
        self.options = options
        # Called after every training batch with (batches done, batches in all, edit loss); it may raise
        # to stop training early (the LM is restored on the way out).
        self.on_batch = on_batch
        self.total_batches = 0
        params = list(editor.nets.parameters())
        self.params = params
        self.optimiser = torch.optim.Adam(params, lr=options.meta_lr)
        self.report = TrainingReport()

    def l2_coef(self) -> float:
        coef = self.options.l2_coef
        return coef * coef if self.options.squared_l2_coef else coef

    def step_optimiser(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        repeats = self.editor.steps if self.options.duplicate_params and self.editor.nets.shared else 1
        for _ in range(repeats):
            self.optimiser.step()
        self.optimiser.zero_grad()
        self.report.optimiser_steps += repeats

    def meta_grads(
        self, history: Sequence[_Batch], references: Sequence[list[torch.Tensor] | None], penalty: Deltas
    ) -> Deltas:
        """G = Σ_k μ^k [∂CE(paraphrases_{t-k}) + loc_coef ∂KL(locality_{t-k})]/∂W + 2 c · penalty."""
        opts, editor = self.options, self.editor
        grads: Deltas = {}
        for k, (batch, reference) in enumerate(zip(reversed(history), reversed(references), strict=True)):
            weight = opts.back_decay**k
            trace, loss = traced_loss_passes(
                editor.model, editor.modules, batch.paraphrase, editor.config.lm_batch_size, weight_grads=True, scale=weight
            )
            if k == 0:
                self.report.paraphrase_losses.append(loss)
            _accumulate(grads, trace.weight_grads)
            if reference is not None and batch.locality is not None:
                _accumulate(grads, kl_weight_grads(editor, batch.locality, reference, weight * opts.loc_coef))
        _accumulate(grads, {name: 2.0 * self.l2_coef() * d for name, d in penalty.items()})
        return grads

    def _references(self, window: Sequence[_Batch]) -> list[list[torch.Tensor] | None]:
        return [reference_log_probs(self.editor, b.locality) if b.locality is not None else None for b in window]

    def train_sequential(self, batches: Sequence[_Batch], progress: bool) -> None:
        """One epoch of sequential (lifelong) training: the LM keeps every training edit (§6.6, §7.1)."""
        editor, opts = self.editor, self.options
        base = snapshot(editor.model, editor.module_names)
        masters = master_copies(editor.model, editor.module_names)
        start = {name: t.clone() for name, t in masters.items()}
        memory_before = editor.edit_state()
        try:
            for t, batch in enumerate(tqdm(batches, desc="meta-train", disable=not progress)):
                began = time.perf_counter()
                window = list(batches[max(0, t - opts.back_depth + 1) : t + 1])
                references = self._references(window)
                records = [editor.run_step(s, batch.edit, masters, update_normaliser=True) for s in self._steps()]
                penalty = self._penalty(records, masters, start)
                grads = self.meta_grads(window, references, penalty)
                for s, record in zip(self._steps(), records, strict=True):
                    editor.hyper_backward(s, record.captures, grads)
                # the training stream keeps its edits, so later batches are solved against them as at edit time
                editor.set_edit_memory(editor.remembered(records))
                self._finish_batch(records, began)
                if opts.reset_every and (t + 1) % opts.reset_every == 0:
                    restore(editor.model, base)
                    masters = {name: x.clone() for name, x in start.items()}
                    editor.set_edit_memory(memory_before)
            if opts.single_adam_step:
                self.step_optimiser()
        finally:
            restore(editor.model, base)
            editor.set_edit_memory(memory_before)

    def train_batch(self, batches: Sequence[_Batch], progress: bool) -> None:
        """One epoch of batch-mode training: every batch starts from W0, an update after each step (§6.7)."""
        editor, opts = self.editor, self.options
        base = snapshot(editor.model, editor.module_names)
        start = master_copies(editor.model, editor.module_names)
        try:
            for batch in tqdm(batches, desc="meta-train", disable=not progress):
                began = time.perf_counter()
                masters = {name: x.clone() for name, x in start.items()}
                records: list[StepRecord] = []
                references = self._references([batch])
                for s in self._steps():
                    record = editor.run_step(s, batch.edit, masters, update_normaliser=True)
                    records.append(record)
                    penalty = record.deltas if opts.revert_between_steps or not opts.l2_on_drift else self._drift(masters, start)
                    grads = self.meta_grads([batch], references, penalty)
                    if opts.revert_between_steps:
                        restore(editor.model, base)
                        masters = {name: x.clone() for name, x in start.items()}
                    editor.hyper_backward(s, record.captures, grads)
                    self.step_optimiser()
                restore(editor.model, base)
                self._finish_batch(records, began)
        finally:
            restore(editor.model, base)

    def _steps(self) -> range:
        return range(1, self.editor.steps + 1)

    @staticmethod
    def _drift(masters: Deltas, start: Deltas) -> Deltas:
        return {name: masters[name] - start[name] for name in masters}

    def _penalty(self, records: Sequence[StepRecord], masters: Deltas, start: Deltas) -> Deltas:
        if self.options.l2_on_drift:
            return self._drift(masters, start)
        total: Deltas = {}
        for record in records:
            _accumulate(total, dict(record.deltas))
        return total

    def _finish_batch(self, records: Sequence[StepRecord], began: float) -> None:
        if self.editor.nets.shared is False and not self.options.single_adam_step:
            self.step_optimiser()
        elif self.editor.nets.shared is False:
            torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.report.edit_losses.append(records[0].diagnostics.edit_loss)
        self.report.seconds_per_batch.append(time.perf_counter() - began)
        if self.on_batch is not None:
            self.on_batch(len(self.report.edit_losses), self.total_batches, records[0].diagnostics.edit_loss)


def meta_train(
    editor: EMSEditor,
    examples: Sequence[EditExample],
    options: TrainingOptions,
    *,
    progress: bool = False,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> TrainingReport:
    """Train the editor's hypernetworks in place; the LM ends bit-identical to how it started.

    With `key_covariance` > 0 and no key statistics yet, the editor first measures them on the model as
    handed in, over the texts of `examples` (`editing.engine.key_covariance`), and trains through that solve.

    The mode (sequential or batch) is the editor's (`EditorConfig.mode`), since it fixes the networks.
    `on_batch(done, total, edit_loss)` reports progress after each training batch; an exception it
    raises stops training (the LM is still restored) and propagates.
    """
    torch.manual_seed(options.seed)
    batches = make_batches(editor, examples, options)
    if editor.config.key_covariance > 0 and not editor.key_moments:
        # measured before any training edit, i.e. on the model as it was handed in (the unedited one)
        texts = reference_texts(examples)
        editor.set_key_moments(key_second_moments(editor.model, editor.tokenizer, editor.modules, texts))
        logger.info("key statistics for key_covariance measured on %d texts", len(texts))
    trainer = MetaTrainer(editor, options, on_batch)
    trainer.total_batches = len(batches) * options.epochs
    for epoch in range(options.epochs):
        if editor.nets.shared:
            trainer.train_batch(batches, progress)
        else:
            trainer.train_sequential(batches, progress)
        logger.info(
            "meta-training epoch %d/%d: %d batches, mean edit loss %.3f, mean paraphrase loss after edit %.3f",
            epoch + 1,
            options.epochs,
            len(batches),
            _mean(trainer.report.edit_losses[-len(batches) :]),
            _mean(trainer.report.paraphrase_losses[-len(batches) :]),
        )
    return trainer.report


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


__all__ = ["MetaTrainer", "TrainingOptions", "TrainingReport", "apply", "input_device", "make_batches", "meta_train"]
