"""Self-describing editor checkpoints: `editor.safetensors` (every hypernetwork tensor, normaliser
statistics included) next to `editor_config.json` (what the tensors are for).

The JSON records the format version, the code version, the model fingerprint (`loading.model_fingerprint`)
and type, the edited modules with their (in, out) shapes, the network shape (mode, S, rank, blocks) and
how the editor was trained (options, data spec and hash). `build_editor` refuses a checkpoint made for
another model or module set with a `ModelMismatch` that says what differs and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editing.config import EditorConfig
from editing.engine.emsedit import EMSEditor
from editing.engine.hypernet import EditorNets
from editing.errors import CheckpointError, ModelMismatch
from editing.model.targets import weight_in_out

# 2: edit gradients δ come from the per-fact loss (`emsedit.fact_loss`); the normaliser statistics of a
# version 1 checkpoint were gathered on batch-mean gradients, about B times smaller, and do not fit.
FORMAT_VERSION = 2
WEIGHTS_FILE = "editor.safetensors"
CONFIG_FILE = "editor_config.json"
PACKAGE = "lifelong-edit-daemon"
KEY_MOMENTS = "key_moments."  # prefix of the key statistics' tensors (optional; editing/engine/key_covariance.py)


def code_version() -> str:
    """The installed version of this project (`unknown` when it runs from an uninstalled tree)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class CheckpointInfo:
    """The JSON half of a checkpoint."""

    model_fingerprint: str
    model_type: str
    modules: dict[str, tuple[int, int]]
    mode: str
    steps: int
    rank: int
    n_blocks: int
    edit_lr: float
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    code_version: str = field(default_factory=code_version)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["modules"] = {name: list(shape) for name, shape in self.modules.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointInfo:
        data = dict(data)
        data["modules"] = {name: (int(s[0]), int(s[1])) for name, s in data["modules"].items()}
        return cls(**data)


@dataclass(frozen=True)
class Checkpoint:
    info: CheckpointInfo
    tensors: dict[str, torch.Tensor]


def checkpoint_info(editor: EMSEditor, fingerprint: str, model_type: str, training: dict[str, Any]) -> CheckpointInfo:
    """Describe `editor` (its networks' shape and modules) for saving."""
    shapes = module_shapes(editor.modules)
    cfg = editor.config
    return CheckpointInfo(fingerprint, model_type, shapes, cfg.mode, cfg.steps, cfg.rank, cfg.n_blocks, cfg.edit_lr, training)


def module_shapes(modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """(in, out) weight shape of each module."""
    return {name: (int(weight_in_out(m).shape[0]), int(weight_in_out(m).shape[1])) for name, m in modules.items()}


def save_checkpoint(directory: Path, editor: EMSEditor, info: CheckpointInfo) -> None:
    """Write the two checkpoint files into `directory` (created if needed; existing files are replaced).

    The key statistics of `key_covariance` (when the editor has them) go into the same tensor file, under
    `key_moments.<module>`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in editor.nets.state_dict().items()}
    tensors |= {KEY_MOMENTS + name: m.detach().cpu().contiguous() for name, m in editor.key_moments.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_FILE).write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read a checkpoint directory; CheckpointError when a file is missing or unreadable."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"editor checkpoint file {path} is missing; train an editor with `python -m editing.train` "
                "or point [editor] checkpoint at a directory holding editor_config.json and editor.safetensors"
            )
    try:
        info = CheckpointInfo.from_json(json.loads(config_path.read_text()))
        tensors = load_file(str(weights_path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read editor checkpoint {directory}: {exc}") from exc
    if info.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"editor checkpoint {directory} has format version {info.format_version}; this code reads "
            f"version {FORMAT_VERSION}: retrain the editor with `python -m editing.train`"
        )
    return Checkpoint(info, tensors)


def check_compatible(
    info: CheckpointInfo,
    fingerprint: str,
    modules: dict[str, tuple[int, int]] | None,
    earlier_fingerprints: Sequence[str] = (),
) -> None:
    """ModelMismatch unless the checkpoint was made for this exact model (and module set, when given).

    `earlier_fingerprints`: what earlier versions of this code called the same model (`LoadedModel`).
    """
    if info.model_fingerprint != fingerprint and info.model_fingerprint not in earlier_fingerprints:
        raise ModelMismatch(
            f"the editor checkpoint was trained for another model (fingerprint {info.model_fingerprint[:12]}…, "
            f"this model is {fingerprint[:12]}…, type {info.model_type}); train an editor for this model with "
            "`python -m editing.train`"
        )
    if modules is not None and info.modules != modules:
        missing = sorted(set(info.modules) - set(modules))
        extra = sorted(set(modules) - set(info.modules))
        raise ModelMismatch(
            "the editor checkpoint was trained for other edited modules "
            f"(only in the checkpoint: {missing or 'none'}; only configured: {extra or 'none'}; or shapes differ); "
            "set [model] edit_modules to the checkpoint's modules or retrain the editor"
        )


def build_editor(
    model: nn.Module,
    tokenizer: Any,
    fingerprint: str,
    checkpoint: Checkpoint,
    config: EditorConfig,
    module_names: list[str] | None = None,
    earlier_fingerprints: Sequence[str] = (),
) -> EMSEditor:
    """An editor for `model` with the checkpoint's networks; ModelMismatch for another model or module set.

    `module_names` are the configured edited modules (None: take the checkpoint's).
    The network shape (mode, S, rank, blocks) comes from the checkpoint; run-time options
    (freeze_normaliser, lm_batch_size, solve_form, hypernet_device) from `config`.
    """
    info = checkpoint.info
    names = list(info.modules)
    check_compatible(info, fingerprint, None, earlier_fingerprints)
    if module_names is not None and set(module_names) != set(names):
        missing, extra = sorted(set(names) - set(module_names)), sorted(set(module_names) - set(names))
        raise ModelMismatch(
            f"the editor checkpoint edits other modules than configured (only in the checkpoint: {missing or 'none'}; "
            f"only configured: {extra or 'none'}); set [model] edit_modules to the checkpoint's modules or retrain"
        )
    editor = EMSEditor(model, tokenizer, names, _runtime_config(info, config))
    check_compatible(info, fingerprint, module_shapes(editor.modules), earlier_fingerprints)
    try:
        load_tensors(editor, checkpoint.tensors)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"editor checkpoint tensors do not fit its own description: {exc}") from exc
    return editor


def load_tensors(editor: EMSEditor, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's tensors into `editor`: its networks (strictly) and any key statistics.

    RuntimeError when the network tensors do not fit the editor's networks, ValueError when the key
    statistics do not fit its modules, CheckpointError when the editor's `key_covariance` needs key
    statistics that the tensors do not hold.
    """
    nets: EditorNets = editor.nets
    moments = {k.removeprefix(KEY_MOMENTS): v for k, v in tensors.items() if k.startswith(KEY_MOMENTS)}
    nets.load_state_dict({k: v.to(editor.device) for k, v in tensors.items() if not k.startswith(KEY_MOMENTS)}, strict=True)
    if moments:
        editor.set_key_moments(moments)
    elif editor.config.key_covariance > 0:
        raise CheckpointError(
            "[editor] key_covariance is set but the editor checkpoint has no key statistics (it was trained "
            "without it): retrain the editor with key_covariance > 0 or set key_covariance = 0"
        )


def _runtime_config(info: CheckpointInfo, config: EditorConfig) -> EditorConfig:
    fields = {"mode": info.mode, "steps": info.steps, "rank": info.rank, "n_blocks": info.n_blocks, "edit_lr": info.edit_lr}
    return config.model_copy(update=fields)
