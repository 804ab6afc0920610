"""Export the model at a version as a standard Hugging Face model directory (safetensors, config, tokenizer).

The directory loads with plain `transformers.AutoModelForCausalLM.from_pretrained(dir)` (and so in
vLLM or TGI) and holds exactly the weights the daemon's model has at that version: the edited
modules' published weights (masters rounded once to the model's dtype), every other tensor as loaded.
It is written into a temporary directory next to `out_dir` and renamed into place, so a crash never
leaves a half-written export under the final name (`staged_directory`, also used by the PEFT adapter
export of `editing.state.adapters`).

`ExportFormat` names the two formats: `hf` (this module) and `peft` (the committed delta as a LoRA
adapter on the base model, `editing.state.adapters`).
"""

from __future__ import annotations

import copy
import enum
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from editing.errors import EditingError
from editing.model.loading import LoadedModel
from editing.state.weights import StagedWeights, WeightState

WEIGHTS_NAME = "model.safetensors"
EXPORT_INFO_NAME = "ked-export.json"


class ExportError(EditingError):
    """The model cannot be exported to the directory given."""


class ExportFormat(enum.StrEnum):
    """What an export writes: a whole model directory, or the committed delta as a PEFT LoRA adapter."""

    HF = "hf"
    PEFT = "peft"


def live_or_staged(state: WeightState, staged: StagedWeights | None) -> StagedWeights:
    """`staged`, or the live version's masters and weights hash, read together under the read lock.

    The masters are shared, not copied: publishing a later version replaces the dict, it never writes
    into these tensors (`WeightState.publish`), so they stay the version's while the caller works.
    """
    if staged is not None:
        return staged
    with state.reading() as version:
        weights = state.weights_sha256()
        # masters_sha256 is only needed to check a rebuild; an export names the weights hash.
        return StagedWeights(version, state.masters(), weights, "")


@dataclass(frozen=True)
class ExportInfo:
    """Where the export went and what it holds."""

    out_dir: Path
    version: int
    weights_sha256: str
    tensors: int


def stored_form(module: nn.Module, in_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An (in, out) tensor in the layout the module stores (Linear: (out, in); Conv1D: (in, out)), on the CPU."""
    tensor = in_out.t() if isinstance(module, nn.Linear) else in_out
    return tensor.to("cpu", dtype).contiguous()


def _state_dict(model: nn.Module, state: WeightState, staged: StagedWeights) -> dict[str, torch.Tensor]:
    """Every persistent tensor once (tied weights under their first name), with the version's edited weights."""
    replaced = {f"{name}.weight": stored_form(module, staged.masters[name], state.dtype) for name, module in state.modules.items()}
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen:  # a tied weight (e.g. lm_head = embed_tokens): transformers re-ties it on load
            continue
        seen.add(identity)
        out[key] = replaced[key] if key in replaced else tensor.detach().to("cpu", copy=True).contiguous()
    return out


def _write_config(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    config: Any = copy.deepcopy(model.config)
    # A GGUF-loaded model still carries its quantisation config, but its tensors are plain floats now.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.save_pretrained(folder)
    generation: Any = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def export_model(
    loaded: LoadedModel, state: WeightState, out_dir: Path, *, staged: StagedWeights | None = None
) -> ExportInfo:
    """Write the model at the live version (or at `staged`, e.g. from `ModelHistory.stage_version`) to `out_dir`.

    `out_dir` must not exist or be empty. The live version's masters and hash are taken together under
    the state's read lock, and the edited weights are written from them, so an edit published meanwhile
    never mixes into the export. Raises ExportError.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    weights = live_or_staged(state, staged)
    # Only the edited modules change between versions, and their weights come from `weights`, so the
    # other tensors can be read without holding up a commit.
    tensors = _state_dict(loaded.model, state, weights)
    with staged_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_config(loaded.model, tmp, state.dtype)
        loaded.tokenizer.save_pretrained(str(tmp))
        info = {
            "format": ExportFormat.HF.value,
            "version": weights.version,
            "weights_sha256": weights.weights_sha256,
            "base_fingerprint": loaded.fingerprint,
            "edited_modules": state.module_names,
            "source": loaded.source,
        }
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return ExportInfo(out_dir, weights.version, weights.weights_sha256, len(tensors))


def check_out_dir(out_dir: Path) -> None:
    """Raise ExportError unless `out_dir` does not exist or is an empty directory."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory; choose a new directory")


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to write into; renamed to `out_dir` when the block succeeds.

    On any error the temporary directory is removed and `out_dir` is left as it was. The files get the
    permissions of ordinary files under the umask. `out_dir` must not exist or be empty (`check_out_dir`).
    """
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        _share_like_ordinary_files(tmp)
        _fsync_tree(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
        _fsync_directory(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    """Make the files durable before the rename publishes them (a crash must not leave empty files)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _share_like_ordinary_files(directory: Path) -> None:
    """Give a staged export the permissions of any other file written here (0755 / 0644 under umask 022).

    `mkdtemp` makes the staging directory 0700 and safetensors writes its file 0600: left so, a model
    server running as another user could not read the model it is meant to serve.
    """
    umask = os.umask(0)  # the only way to read the umask is to set it; put back at once
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
