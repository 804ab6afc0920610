"""Which modules EMSEdit edits, per architecture: facts as data, keyed by `model.config.model_type`.

Each entry records the layer indices for one reference depth (`num_layers`) and where the choice
comes from. A model of another depth gets the layer indices scaled to its depth. A user can always
name the modules explicitly (`[model] edit_modules`).

Orientation: Hugging Face `nn.Linear` stores weights as (out, in); GPT-2's `Conv1D` stores (in, out).
`weight_in_out` is the one place that knows this; the editor works in the (in, out) convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editing.errors import ModelMismatch


@dataclass(frozen=True)
class TargetRule:
    """A module-name template (with `{}` for the layer index) and the layers it applies to."""

    template: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class TargetEntry:
    """The default edited modules of one architecture at one reference depth."""

    model_type: str
    num_layers: int
    rules: tuple[TargetRule, ...]
    reference: str


def _span(first: int, last: int, step: int = 1) -> tuple[int, ...]:
    return tuple(range(first, last + 1, step))


TARGETS: tuple[TargetEntry, ...] = (
    TargetEntry(
        "llama",
        32,
        (
            TargetRule("model.layers.{}.mlp.gate_proj", _span(11, 15)),
            TargetRule("model.layers.{}.mlp.up_proj", _span(18, 24)),
        ),
        "EMSEdit/RLEdit paper Table 3, Llama-3-8B-Instruct",
    ),
    TargetEntry(
        "llama",
        30,
        (TargetRule("model.layers.{}.mlp.up_proj", _span(20, 25)),),
        "SmolLM2-135M: up_proj of layers 20-25 beat the Llama-3 choice at the same relative depth (gate 10-14 + "
        "up 17-22) and down_proj 12-17 in efficacy, generalisation and retention; see bench/results/module_choice.md",
    ),
    TargetEntry(
        "gpt2",
        12,
        (TargetRule("transformer.h.{}.mlp.c_proj", _span(6, 11)),),
        "MALMEN/EMSEdit gpt2 configs (h.6-11 c_proj)",
    ),
    TargetEntry(
        "gptj",
        28,
        (TargetRule("transformer.h.{}.mlp.fc_in", _span(10, 26, 2)),),
        "EMSEdit gptj_seq.yaml (sequential editing)",
    ),
    TargetEntry(
        "gpt_neox",
        32,
        (TargetRule("gpt_neox.layers.{}.mlp.dense_h_to_4h", _span(12, 20, 2)),),
        "no reference config; middle-upper MLP input projections, as for GPT-J",
    ),
    TargetEntry(
        "gemma2",
        42,
        (
            TargetRule("model.layers.{}.mlp.gate_proj", _span(32, 40)),
            TargetRule("model.layers.{}.mlp.up_proj", _span(32, 40)),
        ),
        "EMSEdit gemma-2.yaml (sequential editing)",
    ),
    TargetEntry(
        "qwen2",
        28,
        (
            TargetRule("model.layers.{}.mlp.gate_proj", _span(18, 26)),
            TargetRule("model.layers.{}.mlp.up_proj", _span(18, 26)),
        ),
        "UltraEdit Qwen2.5-7B config",
    ),
    TargetEntry(
        "mistral",
        32,
        (TargetRule("model.layers.{}.mlp.down_proj", _span(17, 19)),),
        "EMSEdit Mistral-7B config",
    ),
)


def supported_model_types() -> list[str]:
    """Model types that have a default entry."""
    return sorted({entry.model_type for entry in TARGETS})


def default_edit_modules(model_type: str, num_layers: int) -> list[str]:
    """The default edited module names for a model of `model_type` with `num_layers` layers.

    An entry for exactly this depth wins; otherwise the entry of the nearest depth is scaled.
    Raises ModelMismatch for an unknown model type (name the modules in the configuration instead).
    """
    entries = [entry for entry in TARGETS if entry.model_type == model_type]
    if not entries:
        raise ModelMismatch(
            f"no default edited modules for model_type {model_type!r} (known: {', '.join(supported_model_types())}); "
            "set [model] edit_modules to the Linear modules to edit"
        )
    entry = min(entries, key=lambda e: (abs(e.num_layers - num_layers), -e.num_layers))
    names: list[str] = []
    for rule in entry.rules:
        layers = rule.layers
        if entry.num_layers != num_layers:
            layers = tuple(min(num_layers - 1, round(i * num_layers / entry.num_layers)) for i in layers)
        for layer in dict.fromkeys(layers):
            names.append(rule.template.format(layer))
    return names


def weight_in_out(module: nn.Module) -> torch.Tensor:
    """The module's weight viewed in the (in, out) convention (a view, not a copy).

    Linear stores (out, in), so it is transposed; GPT-2's Conv1D already stores (in, out).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ModelMismatch(f"module {type(module).__name__} has no 2-D weight to edit")
    if isinstance(module, nn.Linear):
        return weight.t()
    if type(module).__name__ == "Conv1D":
        return weight
    raise ModelMismatch(f"cannot edit module of type {type(module).__name__}: only Linear and Conv1D are supported")


def resolve_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Look up each name in `model`, checking it is an editable Linear/Conv1D; raises ModelMismatch."""
    found = dict(model.named_modules())
    missing = [name for name in names if name not in found]
    if missing:
        raise ModelMismatch(f"edited modules not found in the model: {', '.join(missing)}")
    modules = {name: found[name] for name in names}
    for module in modules.values():
        weight_in_out(module)
    return modules
