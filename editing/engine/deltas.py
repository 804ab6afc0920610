"""Edit plans and how they reach the model: `apply` returns a `Snapshot`, `restore` puts it back.

An `EditPlan` is what the editor proposes: one float32 ΔW per edited module in the (in, out)
convention (see `targets.weight_in_out`), the per-step diagnostics, and the editor state the edit
changed (the running-normaliser statistics). Applying never subtracts: `restore` copies the saved
original tensors back, so apply-then-restore is bit-exact in any dtype.

Master copies: with `masters` (module name -> float32 (in, out) tensor holding the exact current
weights), `apply` computes the new weights as `master + ΔW` in float32, writes them into the model
in the model's dtype and updates the masters; small updates to a bf16 model are then not lost over
many edits. Without `masters`, the current weights (upcast to float32) serve as the master.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from editing.errors import ModelMismatch
from editing.model.targets import resolve_modules, weight_in_out


@dataclass(frozen=True)
class StepDiagnostics:
    """Numbers about one editing step: the edit loss before the step and the size of its ΔW."""

    step: int
    edit_loss: float
    rows: int
    delta_norm: float


@dataclass(frozen=True)
class EditPlan:
    """A proposed edit: ΔW per module (float32, (in, out)), diagnostics and the editor state after it."""

    deltas: dict[str, torch.Tensor]
    steps: tuple[StepDiagnostics, ...] = ()
    editor_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def total_norm(self) -> float:
        """Frobenius norm of all deltas together."""
        return float(sum(float(d.double().square().sum()) for d in self.deltas.values()) ** 0.5)


@dataclass(frozen=True)
class Snapshot:
    """The exact tensors `apply` overwrote: parameter storage per module and the masters before."""

    weights: dict[str, torch.Tensor]
    masters: dict[str, torch.Tensor] = field(default_factory=dict)


def add_deltas(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module-wise sum of two delta mappings (a module missing on one side counts as zero)."""
    out = {name: tensor.clone() for name, tensor in left.items()}
    for name, tensor in right.items():
        out[name] = out[name] + tensor if name in out else tensor.clone()
    return out


def parameter(module: nn.Module) -> torch.Tensor:
    """The module's weight parameter as stored (Linear: (out, in); Conv1D: (in, out))."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


@torch.no_grad()
def apply(
    model: nn.Module, deltas: EditPlan | Mapping[str, torch.Tensor], masters: dict[str, torch.Tensor] | None = None
) -> Snapshot:
    """Add ΔW to the model's edited weights (in place) and return what is needed to undo it exactly.

    Raises ModelMismatch when a module is missing or a ΔW has the wrong shape; the model is then unchanged.
    """
    mapping = deltas.deltas if isinstance(deltas, EditPlan) else deltas
    modules = resolve_modules(model, list(mapping))
    for name, module in modules.items():
        if tuple(weight_in_out(module).shape) != tuple(mapping[name].shape):
            raise ModelMismatch(
                f"delta for {name} has shape {tuple(mapping[name].shape)} but the weight is "
                f"{tuple(weight_in_out(module).shape)} in the (in, out) convention; the plan was made for another model"
            )
    saved = {name: parameter(module).detach().clone() for name, module in modules.items()}
    saved_masters = {name: masters[name].clone() for name in mapping} if masters is not None else {}
    for name, module in modules.items():
        view = weight_in_out(module)
        base = masters[name] if masters is not None else view.float()
        new = base + mapping[name].to(device=base.device, dtype=torch.float32)
        view.copy_(new.to(device=view.device, dtype=view.dtype))
        if masters is not None:
            masters[name] = new
    return Snapshot(saved, saved_masters)


@torch.no_grad()
def restore(model: nn.Module, snapshot: Snapshot, masters: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the snapshot's tensors back into the model (and the masters, when given): bit-exact."""
    modules = resolve_modules(model, list(snapshot.weights))
    for name, module in modules.items():
        parameter(module).copy_(snapshot.weights[name])
    if masters is not None:
        masters.update({name: tensor.clone() for name, tensor in snapshot.masters.items()})


def snapshot(model: nn.Module, names: list[str]) -> Snapshot:
    """The current weights of the named modules, for a later exact `restore`."""
    return Snapshot({name: parameter(m).detach().clone() for name, m in resolve_modules(model, names).items()})


def master_copies(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Float32 (in, out) copies of the named modules' current weights."""
    return {name: weight_in_out(module).detach().float().clone() for name, module in resolve_modules(model, names).items()}
