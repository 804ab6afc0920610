"""Specificity against the frozen base model: what an edit did to prompts it should not have touched.

- `FrozenBase`: the base values of the weights edits may change, and a context manager that puts them
  into the live model for the duration of a reference computation (promise 5: drift is measured
  against the base model, never against the already edited one). Swapping only the edited modules'
  weights avoids keeping a second copy of the whole model.
- `ReferenceStore`: base-model reference tensors, computed once per (base fingerprint, probe set) and
  kept for the store's lifetime; the service owns it. Sets marked `persist` are also written to a
  directory given by the caller and read back after a restart.
- `compare_distributions`: top-1 agreement and KL(base || edited) of next-token distributions.
- `SpecificityCheck`: the per-batch measurement on the standing prompts plus the batch's locality prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from editing.errors import ModelMismatch
from editing.model.scoring import next_token_logprobs

if TYPE_CHECKING:
    from editing.gate.frozen_layers import FrozenLayers

logger = logging.getLogger(__name__)

STANDING_PROMPTS_RESOURCE = "standing_prompts.json"


def standing_prompts() -> list[str]:
    """The general prompts shipped with the project (`editing/standing_prompts.json`), in file order."""
    text = resources.files("editing.gate").joinpath(STANDING_PROMPTS_RESOURCE).read_text(encoding="utf-8")
    return [str(p) for p in json.loads(text)["prompts"]]


def probe_set_hash(*parts: Any) -> str:
    """A sha256 over a JSON rendering of `parts`: the identity of a probe set and how it is scored."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class FrozenBase:
    """The base model's values of every weight an edit may change, and the base fingerprint.

    `weights` maps parameter names (``model.layers.4.mlp.up_proj.weight``) to their base values. An empty
    mapping says the live model is the base model (nothing has been edited yet, or never will be).
    """

    fingerprint: str
    weights: Mapping[str, torch.Tensor]

    @classmethod
    def capture(cls, model: nn.Module, fingerprint: str, parameter_names: Sequence[str]) -> FrozenBase:
        """Copy the named parameters of an unedited `model`; call it before the first delta is applied."""
        params = dict(model.named_parameters())
        missing = [name for name in parameter_names if name not in params]
        if missing:
            raise ModelMismatch(
                f"parameters not found in the model: {', '.join(missing)}; name parameters, not modules"
            )
        return cls(fingerprint, {name: params[name].detach().clone() for name in parameter_names})

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model computes with the base weights; the live values come back after.

        Values are copied, never subtracted, so the live weights are restored bit for bit. The caller
        holds the model exclusively for the duration (no query may see the swapped weights).
        """
        params = dict(model.named_parameters())
        live: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, base in self.weights.items():
                    param = params.get(name)
                    if param is None or param.shape != base.shape:
                        raise ModelMismatch(
                            f"base weight {name!r} does not fit the model; capture FrozenBase again"
                        )
                    live[name] = param.detach().clone()
                    param.copy_(base)
            yield model
        finally:
            with torch.no_grad():
                for name, value in live.items():
                    params[name].copy_(value)


class ReferenceStore:
    """Base-model reference tensors keyed by (name, probe-set hash) for one base fingerprint.

    Computing a reference runs `compute(model)` with `base.active(model)`. In memory the store keeps
    every persisted set and the `max_sets` most recently used others (per-batch locality sets come and
    go). With a `directory`, persisted sets are written to
    ``<directory>/<fingerprint[:16]>/<name>-<hash[:16]>.safetensors`` and read back when the stored
    fingerprint and hash match.
    """

    def __init__(self, base: FrozenBase, directory: Path | None = None, max_sets: int = 8) -> None:
        self.base = base
        self.directory = directory
        self.max_sets = max_sets
        self.computed = 0  #: reference sets computed on the base model (a cache miss)
        self.loaded = 0  #: reference sets read from the directory
        self._pinned: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._recent: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    def path(self, name: str, set_hash: str) -> Path | None:
        """Where a persisted set lives (None without a directory)."""
        if self.directory is None:
            return None
        return self.directory / self.fingerprint[:16] / f"{name}-{set_hash[:16]}.safetensors"

    def get(
        self,
        model: nn.Module,
        name: str,
        set_hash: str,
        compute: Callable[[nn.Module], dict[str, torch.Tensor]],
        *,
        persist: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The reference tensors of probe set (`name`, `set_hash`), computed on the base model if need be."""
        key = (name, set_hash)
        if key in self._pinned:
            return self._pinned[key]
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        tensors = self._load(name, set_hash) if persist else None
        if tensors is None:
            with self.base.active(model):
                tensors = {k: v.detach().cpu().contiguous() for k, v in compute(model).items()}
            self.computed += 1
            if persist:
                self._save(name, set_hash, tensors)
        if persist:
            self._pinned[key] = tensors
        else:
            self._recent[key] = tensors
            while len(self._recent) > self.max_sets:
                self._recent.popitem(last=False)
        return tensors

    def _load(self, name: str, set_hash: str) -> dict[str, torch.Tensor] | None:
        path = self.path(name, set_hash)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:  # type: ignore[no-untyped-call]
                meta = stored.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            logger.warning("ignoring unreadable reference file %s (%s); recomputing", path, exc)
            return None
        if meta.get("fingerprint") != self.fingerprint or meta.get("probe_set_hash") != set_hash:
            logger.warning("reference file %s belongs to another base model or probe set; recomputing", path)
            return None
        self.loaded += 1
        return tensors

    def _save(self, name: str, set_hash: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(name, set_hash)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint, "probe_set_hash": set_hash})
        tmp.replace(path)  # readers never see a half-written file


@dataclass(frozen=True)
class SpecificityResult:
    """How far the edited model's next-token distributions are from the base model's on unrelated prompts."""

    n_prompts: int
    agreement: float  #: share of prompts whose top-1 next token is the base model's
    mean_kl: float  #: mean KL(base || edited) over the prompts, in nats
    max_kl: float  #: the largest per-prompt KL

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def compare_distributions(base_logprobs: torch.Tensor, edited_logprobs: torch.Tensor) -> SpecificityResult:
    """Agreement and KL(base || edited) between two (N, V) tensors of next-token log-probabilities."""
    if base_logprobs.shape != edited_logprobs.shape:
        raise ValueError(
            f"shapes differ: base {tuple(base_logprobs.shape)}, edited {tuple(edited_logprobs.shape)}"
        )
    n = int(base_logprobs.shape[0])
    if n == 0:
        return SpecificityResult(0, 1.0, 0.0, 0.0)
    base = base_logprobs.float()
    edited = edited_logprobs.float()
    agree = (base.argmax(-1) == edited.argmax(-1)).float().mean().item()
    # p_b * (log p_b - log p_e); exp(-inf) * (-inf) is nan, so zero-probability tokens are dropped
    terms = base.exp() * (base - edited)
    kl = torch.where(base.isfinite(), terms, torch.zeros_like(terms)).sum(-1).clamp(min=0.0)
    return SpecificityResult(n, agree, kl.mean().item(), kl.max().item())


class SpecificityCheck:
    """Specificity of the live model on the standing prompts plus per-batch extra (locality) prompts.

    Base references of the standing prompts are computed once and persisted through the store; those of
    each distinct set of extra prompts are computed once and kept while recently used.
    """

    def __init__(self, references: ReferenceStore, standing: Sequence[str], batch_size: int = 16) -> None:
        self.references = references
        self.standing = list(standing)
        self.batch_size = batch_size

    def base_logprobs(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        *,
        persist: bool,
        frozen: FrozenLayers | None = None,
    ) -> torch.Tensor:
        """(N, V) base-model next-token log-probabilities of `prompts`, from the store.

        `frozen` (layers no edit and no base swap changes) lets a computation keep the lower layers'
        output of these prompts for the live pass that follows.
        """
        prompts = list(prompts)
        name = "standing" if persist else "extra"

        def compute(m: nn.Module) -> dict[str, torch.Tensor]:
            return {"logprobs": next_token_logprobs(m, tokenizer, prompts, self.batch_size, frozen=frozen)}

        return self.references.get(model, name, probe_set_hash(name, prompts), compute, persist=persist)[
            "logprobs"
        ]

    def measure(
        self, model: nn.Module, tokenizer: Any, extra_prompts: Sequence[str] = ()
    ) -> SpecificityResult:
        """Agreement and mean KL of the live model against the base on standing + extra prompts."""
        return self.measure_live(model, tokenizer, extra_prompts)[0]

    def measure_live(
        self,
        model: nn.Module,
        tokenizer: Any,
        extra_prompts: Sequence[str] = (),
        frozen: FrozenLayers | None = None,
    ) -> tuple[SpecificityResult, torch.Tensor]:
        """`measure`, and the live model's (N, V) log-probabilities on the same prompts.

        The log-probabilities let a caller compare two live states without another forward pass
        (`compare_distributions(before, after)`): the prompts are the same for the same `extra_prompts`.
        With `frozen` only the layers from the first edited one are run for prompts it has seen.
        """
        standing = set(self.standing)
        extra = list(dict.fromkeys(p for p in extra_prompts if p not in standing))
        base_parts = []
        if self.standing:
            base_parts.append(self.base_logprobs(model, tokenizer, self.standing, persist=True))
        if extra:
            base_parts.append(self.base_logprobs(model, tokenizer, extra, persist=False, frozen=frozen))
        if not base_parts:
            return SpecificityResult(0, 1.0, 0.0, 0.0), torch.empty(0, 0)
        base = torch.cat(base_parts)
        live = next_token_logprobs(model, tokenizer, self.standing + extra, self.batch_size, frozen=frozen)
        return compare_distributions(base, live), live
