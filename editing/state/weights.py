"""The live edited-weight state: fp32 master copies, exact publishing, the weights hash and the read/write lock.

Invariants (promises 1, 4 and 6 of the design):
- The live state at version v is `masters(v) = (((base + Δ_1) + Δ_2) + ... ) + Δ_v`, computed in
  float32 with one elementwise addition per commit in chain order, where base is the edited modules'
  unedited weights upcast to float32 (exact) and Δ_k are the canonical committed deltas
  (`editing.state.lowrank`). Elementwise float32 addition is exactly rounded, so the same inputs in the same
  order give the same bits on any machine: a rebuild at v equals the live state reached by committing,
  whatever commits and reverts happened in between. Nothing is ever subtracted.
- The model's edited weights always equal `masters(v)` rounded once to the model's dtype.
- `weights_sha256` covers exactly what the model holds: per module, in module order, its name,
  (in, out) shape, dtype and bytes of the (in, out) weight in the model's dtype.
- Weights change only inside `writing()`; a query that runs inside `reading()` sees one version
  completely. Writers are preferred, so a stream of queries cannot starve an edit.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from editing.errors import EditingError, ModelMismatch
from editing.model.targets import resolve_modules, weight_in_out


class WeightsHashMismatch(EditingError):
    """Rebuilt or published weights do not hash to the value recorded for their version."""


class ReadWriteLock:
    """Many readers or one writer; writers are preferred; the writing thread may re-enter `writing()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reading: dict[int, int] = {}  # thread id -> nesting depth
        self._writer: int | None = None
        self._depth = 0
        self._waiting_writers = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            # Re-entry: a writer may read what it writes, and a reader may nest reads without queueing
            # behind a waiting writer (which would deadlock).
            nested = self._writer == me or me in self._reading
            while not nested and (self._writer is not None or self._waiting_writers):
                self._cond.wait()
            self._reading[me] = self._reading.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._reading[me] -= 1
                if not self._reading[me]:
                    del self._reading[me]
                if not self._reading:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._waiting_writers += 1
                while self._writer is not None or any(t != me for t in self._reading):
                    self._cond.wait()
                self._waiting_writers -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


def hash_in_out(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, shape, dtype, bytes) of (in, out) tensors, in the order given."""
    digest = hashlib.sha256()
    for name, tensor in named:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class StagedWeights:
    """A complete set of master weights for `version`, computed but not yet published.

    `weights_sha256` is the hash the model will have once they are published; `masters_sha256` that of
    the float32 masters themselves (they differ only for models in a lower-precision dtype).
    """

    version: int
    masters: dict[str, torch.Tensor]
    weights_sha256: str
    masters_sha256: str


class WeightState:
    """The edited modules of one model: base and current fp32 masters, the live version, the lock.

    Create it right after loading the model, before any edit: the weights found then are the base.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str]) -> None:
        self.model = model
        self.modules = resolve_modules(model, list(module_names))
        self.lock = ReadWriteLock()
        views = {name: weight_in_out(module) for name, module in self.modules.items()}
        self.dtype = next(iter(views.values())).dtype
        self._devices = {name: view.device for name, view in views.items()}
        # The base lives on the CPU: only rebuilds need it, and it would double the GPU memory of the edited modules.
        self._base = {name: view.detach().to("cpu", torch.float32, copy=True) for name, view in views.items()}
        self._masters = {name: view.detach().to(dtype=torch.float32, copy=True) for name, view in views.items()}
        self._version = 0

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def version(self) -> int:
        """The version the model's edited weights are at (0: the base)."""
        return self._version

    def masters(self) -> dict[str, torch.Tensor]:
        """The current float32 (in, out) masters (a new dict; the tensors are shared: never modify them)."""
        return dict(self._masters)

    def base(self) -> dict[str, torch.Tensor]:
        """The base weights as float32 (in, out) CPU tensors (shared: never modify them)."""
        return dict(self._base)

    @contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the weights still for a query; yields the version being read."""
        with self.lock.reading():
            yield self._version

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive access for anything that changes the model's weights, even briefly (propose, gate)."""
        with self.lock.writing():
            yield

    def stage(
        self, version: int, deltas: Iterable[Mapping[str, torch.Tensor]], start: Mapping[str, torch.Tensor] | None = None
    ) -> StagedWeights:
        """Masters for `version`: `start` (default: the base) plus each delta mapping in order, in float32.

        Every module must be in `start`; a delta mapping may leave modules out (zero). Nothing is published.
        """
        return self._staged(version, self.replay(deltas, start))

    def replay(
        self, deltas: Iterable[Mapping[str, torch.Tensor]], start: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """`start` (default: the base) plus each delta mapping in order, in float32, without hashing."""
        origin = self._base if start is None else start
        missing = [name for name in self.modules if name not in origin]
        if missing:
            raise ModelMismatch(f"the starting state has no weights for {missing}; it was made for other modules")
        masters = {name: origin[name].to(self._devices[name], torch.float32, copy=True) for name in self.modules}
        for delta in deltas:
            self._check_delta(delta)
            for name, tensor in delta.items():
                # The one arithmetic step of the exactness argument: an elementwise float32 add, in chain order.
                masters[name] = masters[name] + tensor.to(masters[name].device, torch.float32)
        return masters

    def staged(self, version: int, masters: dict[str, torch.Tensor]) -> StagedWeights:
        """Wrap complete masters for `version` with their hashes (nothing is published)."""
        return self._staged(version, masters)

    def stage_commit(self, version: int, delta: Mapping[str, torch.Tensor]) -> StagedWeights:
        """The current masters plus one delta: what committing it will publish."""
        return self.stage(version, [delta], start=self._masters)

    def _staged(self, version: int, masters: dict[str, torch.Tensor]) -> StagedWeights:
        weights = hash_in_out((name, masters[name].to(self.dtype)) for name in self.modules)
        exact = weights if self.dtype == torch.float32 else hash_in_out(masters.items())
        return StagedWeights(version, masters, weights, exact)

    def _check_delta(self, delta: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in delta.items():
            if name not in self.modules:
                raise ModelMismatch(f"a delta names module {name!r}, which is not edited here ({self.module_names})")
            if tuple(tensor.shape) != tuple(self._base[name].shape):
                raise ModelMismatch(
                    f"the delta for {name} has shape {tuple(tensor.shape)}, the weight is "
                    f"{tuple(self._base[name].shape)} (in, out): it was made for another model"
                )

    @torch.no_grad()
    def publish(self, staged: StagedWeights) -> None:
        """Make `staged` the live state: write every edited weight in the model's dtype, under the write lock."""
        if set(staged.masters) != set(self.modules):
            raise ModelMismatch(f"staged weights cover {sorted(staged.masters)}, not {sorted(self.modules)}")
        with self.lock.writing():
            for name, module in self.modules.items():
                view = weight_in_out(module)
                view.copy_(staged.masters[name].to(device=view.device, dtype=view.dtype))
            self._masters = dict(staged.masters)
            self._version = staged.version

    def weights_sha256(self) -> str:
        """The hash of the model's edited weights as they are now (see the module docstring)."""
        with self.lock.reading():
            return hash_in_out((name, weight_in_out(module)) for name, module in self.modules.items())

    def verify(self, expected: str, what: str) -> None:
        """Raise WeightsHashMismatch unless the live weights hash to `expected`."""
        actual = self.weights_sha256()
        if actual != expected:
            raise WeightsHashMismatch(
                f"{what}: the edited weights hash to {actual[:16]}… but {expected[:16]}… was recorded; the base "
                "model, the edited modules or an artefact differ from the ones the commit was made with"
            )
