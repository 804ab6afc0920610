"""The editing methods the evaluation compares, as data, and how each becomes a ready-to-edit `PreparedMethod`.

Every method edits the same modules of the same model through one interface: `propose(facts, masters)`
returns an `EditPlan` (the model untouched), the harness applies it; methods with running statistics
(every hypernetwork method) also carry editor state, which the harness adopts after each applied edit and
restores at the end. Methods that learn are meta-trained first (`editing.engine.training.meta_train`) on the
training facts, or loaded from a checkpoint.

`METHODS` is the registry (`docs/evaluation.md` explains each entry and where its settings come from):

| name | family | steps | training |
|---|---|---|---|
| ft | FT-L (`baselines/ft.py`) | - | none (25 Adam steps per edit batch) |
| mend | MEND-style (`baselines/mend.py`) | 1 | batch mode, KL locality, an optimiser step per batch |
| malmen, malmen2 | hypernetwork + ridge solve | 1, 2 | batch mode, KL locality (MALMEN), no L2 |
| rledit, rledit2 | hypernetwork + ridge solve | 1, 2 | sequential (lifelong), KL locality, backtracking 10 |
| ultraedit | training-free (`baselines/ultraedit.py`) | 1 | none |
| emsedit1..emsedit4 | EMSEdit | S = 1..4 | sequential, paraphrase loss + L2, the reference schedule |
| emsedit2-mem, emsedit2-mem-cov | EMSEdit + this project's edit memory (and key covariance) | 2 | as EMSEdit |

Every method but the last two runs without the edit memory (`preserve_edits` 0), as its paper has it.
`daemon_default_method` names the entry the daemon edits with by default (today `emsedit2-mem`), derived from
the defaults of `EditorConfig` and `TrainingOptions` rather than written down.

`parse_variant` derives a named variant of a registry entry with changed settings
(`LABEL=BASE:field=value,...`) for experiments on training facts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from editing.config import EditorConfig
from editing.data import EditExample, examples_hash
from editing.engine.checkpoint import (
    check_compatible,
    checkpoint_info,
    load_checkpoint,
    load_tensors,
    module_shapes,
    save_checkpoint,
)
from editing.engine.deltas import EditPlan
from editing.engine.emsedit import EMSEditor
from editing.engine.key_covariance import reference_texts
from editing.engine.mentions import MentionSettings, Router, build_router
from editing.engine.training import TrainingOptions, meta_train
from editing.errors import CheckpointError
from editing.evaluation.baselines.ft import FTConfig, FTEditor
from editing.evaluation.baselines.mend import MENDEditor, mend_config
from editing.evaluation.baselines.ultraedit import UltraEditor, ultraedit_config

logger = logging.getLogger(__name__)

Family = Literal["ft", "hypernet", "mend", "ultraedit"]
#: EditorConfig fields that say where and how an editor runs, not what it does
_NOT_SETTINGS = {"checkpoint", "hypernet_device", "seed"}


@dataclass(frozen=True)
class MethodSpec:
    """One method: its family, editor settings and meta-training options (None: nothing to train)."""

    name: str
    family: Family
    description: str
    editor: EditorConfig = field(default_factory=EditorConfig)
    training: TrainingOptions | None = None
    ft: FTConfig | None = None
    routing: MentionSettings | None = None  # edits act only from a mention of an edited fact (engine/mentions.py)
    shares_editor_with: str | None = None  # the entry whose trained editor this one uses (same settings)

    def settings(self) -> dict[str, Any]:
        """Everything that defines the method, JSON-ready (for reports and checkpoint reuse)."""
        out: dict[str, Any] = {"family": self.family}
        if self.family == "ft":
            out["ft"] = asdict(self.ft or FTConfig())
            return out
        out["editor"] = self.editor.model_dump(mode="json", exclude=_NOT_SETTINGS)
        out["training"] = asdict(self.training) if self.training else None
        if self.routing is not None:
            out["routing"] = asdict(self.routing)
        return out


# Training uses every whole batch of 16 the training facts allow (`--train-limit` trims the facts).
_ALL = TrainingOptions(n_batches=0)
_MALMEN = replace(_ALL, locality="kl", loc_coef=1.0, l2_coef=0.0)
# RLEdit: loc_coef 0.6, backtracking depth 10 with decay 0.95; its L2 term has no gradient (spec §7.1), so 0.
_RLEDIT = replace(_ALL, locality="kl", loc_coef=0.6, l2_coef=0.0, back_depth=10, back_decay=0.95)


def _paper(**fields: Any) -> EditorConfig:
    """An EditorConfig as the papers' methods have it: without this project's edit memory."""
    return EditorConfig(preserve_edits=0.0, **fields)


def _registry() -> dict[str, MethodSpec]:
    specs = [
        MethodSpec("ft", "ft", "FT-L: constrained fine-tuning of the edited modules", ft=FTConfig()),
        MethodSpec(
            "mend", "mend", "MEND-style: summed per-token ũδ̃ᵀ, no solve, KL locality",
            editor=mend_config(_paper()), training=replace(_MALMEN, single_adam_step=False),
        ),
        MethodSpec("malmen", "hypernet", "MALMEN: S=1, batch mode, KL locality", _paper(steps=1, mode="batch"), _MALMEN),
        MethodSpec("malmen2", "hypernet", "MALMEN2: MALMEN with S=2", _paper(steps=2, mode="batch"), _MALMEN),
        MethodSpec("rledit", "hypernet", "RLEdit-style: S=1, lifelong training, KL, backtracking", _paper(steps=1), _RLEDIT),
        MethodSpec("rledit2", "hypernet", "RLEdit2: RLEdit with S=2", _paper(steps=2), _RLEDIT),
        MethodSpec("ultraedit", "ultraedit", "UltraEdit: training-free, lifelong normalisation", ultraedit_config(_paper())),
    ]
    specs += [
        MethodSpec(f"emsedit{s}", "hypernet", f"EMSEdit, S={s}: paraphrase loss + L2, lifelong training", _paper(steps=s), _ALL)
        for s in range(1, 5)
    ]
    specs += [
        MethodSpec(
            "emsedit2-mem", "hypernet", "EMSEdit, S=2, with the edit memory (preserve_edits 1): the daemon's default",
            EditorConfig(steps=2, preserve_edits=1.0), _ALL,
        ),
        MethodSpec(
            "emsedit2-mem-routed", "hypernet",
            "EMSEdit, S=2, edit memory, and mention routing: an edit acts only from a mention of an edited fact on",
            EditorConfig(steps=2, preserve_edits=1.0), _ALL, routing=MentionSettings(), shares_editor_with="emsedit2-mem",
        ),
        MethodSpec(
            "emsedit2-mem-cov", "hypernet", "EMSEdit, S=2, edit memory and key covariance (preserve_edits 1, key_covariance 100)",
            EditorConfig(steps=2, preserve_edits=1.0, key_covariance=100.0), _ALL,
        ),
    ]
    return {spec.name: spec for spec in specs}


METHODS: dict[str, MethodSpec] = _registry()
ALIASES = {"emsedit": "emsedit2"}


def get_method(name: str) -> MethodSpec:
    """The registry entry `name` (or an alias); ValueError listing the known names otherwise."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join([*METHODS, *ALIASES])}")
    return METHODS[key]


def daemon_default_method() -> str | None:
    """The registry entry that is the daemon's default editor, or None when no entry is.

    The daemon builds its editor from `EditorConfig()` unless `[editor]` says otherwise, and trains it on first
    run with the engine's default `TrainingOptions` (sized by its own batch count, batch size and seed): the
    entry is the hypernetwork method with exactly those settings.
    """
    editor = EditorConfig().model_dump(mode="json", exclude=_NOT_SETTINGS)
    schedule = asdict(TrainingOptions())
    sized = ("n_batches", "batch_size", "seed")  # the daemon sizes its training itself

    def is_default(spec: MethodSpec) -> bool:
        if spec.family != "hypernet" or spec.training is None or spec.routing is not None:
            return False
        training = asdict(spec.training)
        same_schedule = all(training[k] == v for k, v in schedule.items() if k not in sized)
        return same_schedule and spec.settings()["editor"] == editor

    matches = [name for name, spec in METHODS.items() if is_default(spec)]
    return matches[0] if len(matches) == 1 else None


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def with_settings(spec: MethodSpec, name: str, changes: dict[str, Any]) -> MethodSpec:
    """`spec` renamed to `name` with fields of its EditorConfig, TrainingOptions or FTConfig changed."""
    editor, training, ft = {}, {}, {}
    if changes.get("key_covariance") and spec.family != "hypernet":  # the others have no ridge solve to add it to
        raise ValueError(f"method {spec.name!r} has no setting 'key_covariance' (hypernetwork methods only)")
    training_fields = {f.name for f in fields(TrainingOptions)}
    ft_fields = {f.name for f in fields(FTConfig)}
    for key, value in changes.items():
        if spec.family == "ft" and key in ft_fields:
            ft[key] = value
        elif spec.family != "ft" and key in EditorConfig.model_fields:
            editor[key] = value
        elif spec.training is not None and key in training_fields:
            training[key] = value
        else:
            raise ValueError(f"method {spec.name!r} has no setting {key!r}")
    return replace(
        spec,
        name=name,
        editor=EditorConfig(**{**spec.editor.model_dump(), **editor}),
        training=replace(spec.training, **training) if spec.training is not None else None,
        ft=replace(spec.ft, **ft) if spec.ft is not None else None,
    )


def parse_assignments(assignments: str, where: str) -> dict[str, Any]:
    """`field=value,field=value` -> {field: value} (booleans, none, ints and floats parsed; else strings).

    ValueError naming `where` (the whole argument) and the item that is not field=value.
    """
    changes: dict[str, Any] = {}
    for item in filter(str.strip, assignments.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{where}: {item!r} is not field=value")
        changes[key.strip()] = _parse_value(value)
    return changes


def parse_variant(text: str) -> MethodSpec:
    """`LABEL=BASE:field=value,field=value` -> a MethodSpec named LABEL; ValueError with the expected form."""
    label, sep, rest = text.partition("=")
    base, _, assignments = rest.partition(":")
    if not sep or not label.strip() or not base.strip():
        raise ValueError(f"variant {text!r} is not LABEL=BASE:field=value,...")
    return with_settings(get_method(base), label.strip(), parse_assignments(assignments, f"variant {text!r}"))


class Proposer(Protocol):
    """What the harness needs from an editor."""

    def propose(self, examples: Sequence[EditExample], masters: dict[str, torch.Tensor] | None = None) -> EditPlan: ...


@dataclass
class PreparedMethod:
    """A method ready to edit: its editor, the modules it edits and what preparing it cost."""

    spec: MethodSpec
    editor: Proposer
    module_names: list[str]
    train_facts: int = 0
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    source: str = "untrained"  # "untrained", "trained", "reused <dir>" or "checkpoint <dir>"
    router: Router | None = None  # with `spec.routing`: the mention router, without keys

    def state(self) -> dict[str, torch.Tensor]:
        """The editor state an edit changes (normaliser statistics; empty for FT)."""
        return self.editor.edit_state() if isinstance(self.editor, EMSEditor) else {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if isinstance(self.editor, EMSEditor):
            self.editor.load_edit_state(state)

    def adopt(self, plan: EditPlan) -> None:
        """Make the state of an applied plan current (lifelong normalisation)."""
        if isinstance(self.editor, EMSEditor):
            self.editor.adopt_state(plan)


@dataclass(frozen=True)
class ModelHandle:
    """The model to edit and what identifies it."""

    model: nn.Module
    tokenizer: Any
    fingerprint: str
    model_type: str
    earlier_fingerprints: tuple[str, ...] = ()


def _editor(spec: MethodSpec, handle: ModelHandle, names: list[str], config: EditorConfig) -> EMSEditor:
    if spec.family == "ultraedit":
        return UltraEditor(handle.model, handle.tokenizer, names, config)
    cls = MENDEditor if spec.family == "mend" else EMSEditor
    return cls(handle.model, handle.tokenizer, names, config)


def _training_key(spec: MethodSpec, train_hash: str, seed: int) -> str:
    # routing does not change what is trained: a routed method reuses its unrouted twin's editor
    settings = {k: v for k, v in spec.settings().items() if k != "routing"}
    blob = json.dumps({"settings": settings, "data": train_hash, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load(editor: EMSEditor, directory: Path, handle: ModelHandle) -> dict[str, Any]:
    checkpoint = load_checkpoint(directory)
    check_compatible(checkpoint.info, handle.fingerprint, module_shapes(editor.modules), handle.earlier_fingerprints)
    try:
        load_tensors(editor, checkpoint.tensors)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"editor checkpoint {directory} does not fit this method's networks (mode, steps, rank, blocks): {exc}"
        ) from exc
    return checkpoint.info.training


def _checkpoint_config(spec: MethodSpec, directory: Path, seed: int) -> EditorConfig:
    """The method's EditorConfig with the network shape a checkpoint was saved with."""
    info = load_checkpoint(directory).info
    shape = {"mode": info.mode, "steps": info.steps, "rank": info.rank, "n_blocks": info.n_blocks, "edit_lr": info.edit_lr}
    return EditorConfig(**{**spec.editor.model_dump(), **shape, "seed": seed})


def prepare(
    spec: MethodSpec,
    handle: ModelHandle,
    module_names: list[str],
    train_examples: Sequence[EditExample],
    *,
    seed: int = 0,
    checkpoint: Path | None = None,
    editors_dir: Path | None = None,
    progress: bool = False,
) -> PreparedMethod:
    """Build `spec`'s editor: load `checkpoint`, reuse a matching editor in `editors_dir`, or meta-train it.

    Training-free methods ignore the training facts. A newly trained editor is saved to `editors_dir`
    (when given) under a name that encodes its settings, training facts and seed, so a later run reuses it.
    A routed method also gets its router, its statistics measured on the training facts' texts on the
    model as it is now (call this on the unedited model); ValueError without training facts.
    """
    if spec.routing is not None and not train_examples:
        raise ValueError(f"method {spec.name!r} routes by mentions: its router needs the training facts (--train-data)")
    prepared = _prepare_editor(
        spec, handle, module_names, train_examples, seed=seed, checkpoint=checkpoint, editors_dir=editors_dir, progress=progress
    )
    if spec.routing is not None:
        texts = reference_texts(train_examples, limit=spec.routing.bank_texts)
        prepared.router = build_router(handle.model, handle.tokenizer, module_names, texts, spec.routing)
    return prepared


def _prepare_editor(
    spec: MethodSpec,
    handle: ModelHandle,
    module_names: list[str],
    train_examples: Sequence[EditExample],
    *,
    seed: int = 0,
    checkpoint: Path | None = None,
    editors_dir: Path | None = None,
    progress: bool = False,
) -> PreparedMethod:
    """Build `spec`'s editor: load `checkpoint`, reuse a matching editor in `editors_dir`, or meta-train it.

    Training-free methods ignore the training facts. A newly trained editor is saved to `editors_dir`
    (when given) under a name that encodes its settings, training facts and seed, so a later run reuses it.
    """
    if spec.family == "ft":
        return PreparedMethod(spec, FTEditor(handle.model, handle.tokenizer, module_names, spec.ft), module_names)
    if checkpoint is not None:
        config = _checkpoint_config(spec, checkpoint, seed)
        editor = _editor(spec, handle, module_names, config)
        training = _load(editor, checkpoint, handle)
        facts = int(training.get("n_examples", 0))
        return PreparedMethod(
            spec, editor, module_names, facts, float(training.get("train_seconds", 0.0)),
            float(training.get("train_cpu_seconds", 0.0)), f"checkpoint {checkpoint}",
        )
    torch.manual_seed(seed)
    editor = _editor(spec, handle, module_names, spec.editor.model_copy(update={"seed": seed}))
    if spec.training is None:
        return PreparedMethod(spec, editor, module_names)
    if not train_examples:
        raise ValueError(f"method {spec.name!r} needs training facts (--train-data) or a --checkpoint")
    train_hash = examples_hash(train_examples)
    name = spec.shares_editor_with or spec.name
    target = editors_dir / f"{name}-{_training_key(spec, train_hash, seed)}" if editors_dir else None
    if target is not None and target.is_dir():
        training = _load(editor, target, handle)
        logger.info("%s: reusing the trained editor in %s", spec.name, target)
        return PreparedMethod(
            spec, editor, module_names, int(training["n_examples"]), float(training["train_seconds"]),
            float(training["train_cpu_seconds"]), f"reused {target}",
        )
    options = replace(spec.training, seed=seed)
    began, cpu = time.perf_counter(), time.process_time()
    report = meta_train(editor, train_examples, options, progress=progress)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    used = len(report.edit_losses) // max(1, options.epochs) * options.batch_size
    if target is not None:
        info = {"data_hash": train_hash, "n_examples": used, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}
        info |= {"settings": spec.settings(), "optimiser_steps": report.optimiser_steps}
        save_checkpoint(target, editor, checkpoint_info(editor, handle.fingerprint, handle.model_type, info))
    return PreparedMethod(spec, editor, module_names, used, seconds, cpu_seconds, "trained")
