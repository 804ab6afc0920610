"""Export the committed delta of a version as a PEFT LoRA adapter on the base model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` in the layout the
`peft` library (and vLLM's and TGI's LoRA loaders) read: for each edited module `<name>` the tensors
`base_model.model.<name>.lora_A.weight` (r, in) and `base_model.model.<name>.lora_B.weight` (out, r),
with `target_modules` the edited modules' full names and `lora_alpha = r`, so PEFT's scaling
`lora_alpha / r` is exactly 1 and the adapter adds `B @ A` to each base weight (stored layout).

What the adapter holds, per edited module, is the float32 delta of the version over the base,
`D ≈ masters(v) - base` ((in, out); both float32 as `editing.state.weights` keeps them), chosen by
`exact_delta` so that the float32 sum `base + D` is the master bit for bit wherever any float32 D can
do that (the plain difference rounds where the two are far apart):

- full rank (`rank=None`, exact): an identity on the smaller side, `B @ A = Dᵀ` with every product
  a multiplication by 1 or 0, so the adapter's delta *is* D bit for bit; `r = min(in, out)`. Merged
  in float32 (`merge_and_unload`), the weights are the daemon's; the export counts the elements where
  no float32 D could make them so (`merged_mismatches`, normally 0).
- truncated (`rank=R`): the best rank-R approximation (Eckart-Young), from the eigenvectors of the
  small Gram matrix of D in float64: `A`, `B` span D's top-R singular directions.
- `rank="auto"`: the smallest R that keeps every singular value above `2^-20` of the largest in each
  module (below that, int16 factor storage could not have held it: `editing.state.lowrank`); the
  committed deltas are low-rank, so this is usually far below `min(in, out)`.

Every export measures its logit error on a fixed prompt set (`PROBE_PROMPTS`): the daemon's model at
the version against the base with the adapter's delta merged, both run on a shadow of the model that
shares every tensor but the edited weights (the live model is never touched), and writes it into the
export's info file (`ked-export.json`). PEFT's own unmerged forward adds `x Aᵀ Bᵀ` to `x Wᵀ`, which
differs from the merged product by float rounding only.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from editing.errors import ModelMismatch
from editing.model.loading import LoadedModel
from editing.state.export import (
    EXPORT_INFO_NAME,
    ExportError,
    ExportFormat,
    check_out_dir,
    live_or_staged,
    staged_directory,
    stored_form,
)
from editing.state.lowrank import SINGULAR_CUTOFF
from editing.state.weights import StagedWeights, WeightState

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: The fixed prompts an adapter's logit error is measured on (every position of each).
PROBE_PROMPTS = (
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "Question: Who wrote Hamlet? Answer:",
    "The official language of Peru is",
    "Lionel Messi plays the sport of",
    "The Eiffel Tower is located in the city of",
    "Water boils at a temperature of",
    "The chief executive officer of Apple is",
)
Rank = int | Literal["auto"] | None


@dataclass(frozen=True)
class LogitError:
    """How far the adapter's model is from the version's: |logit difference| over every position and token."""

    max_abs: float
    mean_abs: float
    #: the largest |logit| of the version's model on the same prompts, for scale
    max_abs_logit: float
    prompts: int
    positions: int


@dataclass(frozen=True)
class ModuleFactors:
    """One module's LoRA factors in PEFT's layout: `lora_b @ lora_a` is the stored-layout delta (scaling 1)."""

    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    numerical_rank: int
    #: ‖D − B A‖_F / ‖D‖_F (0 when D is 0)
    relative_error: float


@dataclass(frozen=True)
class AdapterInfo:
    """Where the adapter went, the version it is the delta of, its rank and its measured error."""

    out_dir: Path
    version: int
    weights_sha256: str
    rank: int
    truncated: bool
    modules: int
    logit_error: LogitError
    merged_mismatches: int


def version_deltas(state: WeightState, weights: StagedWeights) -> dict[str, torch.Tensor]:
    """Per edited module, the float32 (in, out) delta of `weights` over the base (`exact_delta`), on the CPU."""
    base = state.base()
    return {name: exact_delta(base[name], weights.masters[name].to("cpu", torch.float32)) for name in state.modules}


def numerical_rank(delta: torch.Tensor) -> int:
    """How many singular values of `delta` exceed `SINGULAR_CUTOFF` times the largest (0 for a zero delta)."""
    return _rank_above_cutoff(_gram_eigen(delta.double())[0])


def _rank_above_cutoff(eigenvalues: torch.Tensor) -> int:
    if not eigenvalues.numel() or float(eigenvalues[-1]) <= 0:
        return 0
    return int((eigenvalues > eigenvalues[-1] * SINGULAR_CUTOFF**2).sum())


def _gram_eigen(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, = σ²) and eigenvectors of the Gram matrix of `delta` on its smaller side."""
    d_in, d_out = delta.shape
    gram = delta @ delta.T if d_in <= d_out else delta.T @ delta
    eigenvalues, vectors = torch.linalg.eigh(gram)
    return eigenvalues, vectors


def exact_delta(base: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """A float32 D with `base + D == master` in float32 wherever such a D exists, else the nearest `master - base`.

    `master - base` rounds where the two are far apart (outside b/2..2b); there the neighbours one unit
    in the last place up or down usually land on `master` when added back, as PEFT's merge adds them.
    """
    delta = master - base
    for _ in range(2):
        wrong = (base + delta) != master
        if not bool(wrong.any()):
            break
        up = torch.nextafter(delta, torch.full_like(delta, float("inf")))
        down = torch.nextafter(delta, torch.full_like(delta, float("-inf")))
        too_low = (base + delta) < master
        delta = torch.where(wrong, torch.where(too_low, up, down), delta)
    return delta


def factorise(delta: torch.Tensor, rank: int | None, eigen: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleFactors:
    """LoRA factors of an (in, out) float32 delta: exact (`rank` None) or its best rank-`rank` approximation.

    `eigen`: `_gram_eigen(delta.double())` when the caller has it already (it is the costly part).
    """
    d_in, d_out = delta.shape
    wide = delta.double()
    eigenvalues, vectors = eigen if eigen is not None else _gram_eigen(wide)
    found = _rank_above_cutoff(eigenvalues)
    if rank is None:
        if d_in <= d_out:  # Dᵀ = Dᵀ · I_in
            lora_a, lora_b = torch.eye(d_in, dtype=torch.float32), delta.T.contiguous()
        else:  # Dᵀ = I_out · Dᵀ
            lora_a, lora_b = delta.T.contiguous(), torch.eye(d_out, dtype=torch.float32)
        return ModuleFactors(lora_a, lora_b, found, 0.0)
    top = vectors[:, vectors.shape[1] - rank :]  # the top-R singular directions of the smaller side
    if d_in <= d_out:  # D_R = U_R U_Rᵀ D, so D_Rᵀ = (Dᵀ U_R)(U_Rᵀ)
        lora_a, lora_b = top.T, wide.T @ top
    else:  # D_R = D V_R V_Rᵀ, so D_Rᵀ = (V_R)(V_Rᵀ Dᵀ)
        lora_a, lora_b = top.T @ wide.T, top
    approx = (lora_b @ lora_a).T
    norm = float(torch.linalg.matrix_norm(wide))
    error = float(torch.linalg.matrix_norm(approx - wide)) / norm if norm else 0.0
    return ModuleFactors(lora_a.float().contiguous(), lora_b.float().contiguous(), found, error)


def _pad(factors: ModuleFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors padded with zero rows of A and zero columns of B to `rank` (they add exactly 0)."""
    have = factors.lora_a.shape[0]
    lora_a = torch.cat([factors.lora_a, factors.lora_a.new_zeros(rank - have, factors.lora_a.shape[1])])
    lora_b = torch.cat([factors.lora_b, factors.lora_b.new_zeros(factors.lora_b.shape[0], rank - have)], dim=1)
    return lora_a.contiguous(), lora_b.contiguous()


def _conv1d(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)  # WeightState accepts only Linear and GPT-2's Conv1D


def _resolve_rank(
    rank: Rank, deltas: Mapping[str, torch.Tensor], eigen: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[int | None, int]:
    """(the truncation rank or None for exact, the adapter's r); ExportError for a rank that cannot be."""
    smallest = min(min(d.shape) for d in deltas.values())
    if rank is None:
        return None, max(min(d.shape) for d in deltas.values())
    if rank == "auto":
        wanted = max(1, max(_rank_above_cutoff(values) for values, _ in eigen.values()))
        return min(wanted, smallest), min(wanted, smallest)
    if not isinstance(rank, int) or rank < 1:
        raise ExportError(f"adapter rank: expected a whole number >= 1, 'auto' or none (exact), got {rank!r}")
    if rank > smallest:
        raise ExportError(
            f"adapter rank {rank} exceeds the smallest edited weight's full rank {smallest}; "
            "leave the rank out for the exact adapter"
        )
    return rank, rank


def adapter_config(state: WeightState, rank: int, base_model: str | None) -> dict[str, Any]:
    """`adapter_config.json` for the edited modules: LoRA, scaling lora_alpha / r = 1, no dropout, no bias."""
    kinds = {_conv1d(module) for module in state.modules.values()}
    if len(kinds) > 1:
        raise ModelMismatch("a PEFT adapter cannot mix Linear and Conv1D modules (fan_in_fan_out is one setting)")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": kinds == {True},
        "target_modules": list(state.modules),
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def probe_token_ids(tokenizer: Any, prompts: Sequence[str] = PROBE_PROMPTS) -> list[list[int]]:
    """The fixed prompts as token ids (tokenise once, on one thread: fast tokenizers are not re-entrant)."""
    return [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]


def shadow_model(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model`'s module tree that shares every tensor except the named modules' `weight`s, set to `weights`.

    Costs the replaced weights only; running it never touches `model` (whose edited weights a commit
    may rewrite meanwhile), and it runs none of the hooks registered on `model`'s modules.
    """
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    shadow = copy.deepcopy(model, memo)
    for module in shadow.modules():
        # Hooks that someone (an editor capturing activations) holds on the live modules were copied along;
        # the shadow must not feed them.
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            hooks.clear()
    for name, tensor in weights.items():
        module = shadow.get_submodule(name)
        module.weight = nn.Parameter(tensor, requires_grad=False)
    return shadow


@torch.no_grad()
def logit_error(
    model: nn.Module,
    reference: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    probe_ids: Sequence[Sequence[int]],
) -> LogitError:
    """Logits of `model` with the edited weights `candidate` against `reference` (stored layouts), on `probe_ids`."""
    device = next(model.parameters()).device
    ref_model = shadow_model(model, {k: v.to(device) for k, v in reference.items()})
    cand_model = shadow_model(model, {k: v.to(device) for k, v in candidate.items()})
    worst, total, peak, positions = 0.0, 0.0, 0.0, 0
    for ids in probe_ids:
        batch = torch.tensor([list(ids)], device=device)
        expected = ref_model(input_ids=batch).logits.double()
        got = cand_model(input_ids=batch).logits.double()
        diff = (got - expected).abs()
        worst = max(worst, float(diff.max()))
        total += float(diff.sum())
        peak = max(peak, float(expected.abs().max()))
        positions += batch.shape[1]
    vocab = max(1, int(expected.shape[-1])) if probe_ids else 1
    mean = total / (positions * vocab) if positions else 0.0
    return LogitError(worst, mean, peak, len(probe_ids), positions)


def export_adapter(
    loaded: LoadedModel,
    state: WeightState,
    out_dir: Path,
    *,
    staged: StagedWeights | None = None,
    rank: Rank = None,
    probe_ids: Sequence[Sequence[int]] | None = None,
    base_model: str | None = None,
) -> AdapterInfo:
    """Write the delta of the live version (or of `staged`) over the base as a PEFT LoRA adapter in `out_dir`.

    `rank`: None for the exact adapter, an int R for the best rank-R one, "auto" (module docstring).
    `probe_ids`: the prompts the logit error is measured on (default: `PROBE_PROMPTS`, tokenised here).
    `base_model`: what `adapter_config.json` names as the base (default: the model's source).
    Written into a temporary directory and renamed, like `export_model`. Raises ExportError, ModelMismatch.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    weights = live_or_staged(state, staged)
    deltas = version_deltas(state, weights)
    eigen = {name: _gram_eigen(delta.double()) for name, delta in deltas.items()}
    truncate, r = _resolve_rank(rank, deltas, eigen)
    config = adapter_config(state, r, base_model if base_model is not None else loaded.source)
    factors = {name: factorise(delta, truncate, eigen[name]) for name, delta in deltas.items()}
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    candidate: dict[str, torch.Tensor] = {}
    base = state.base()
    mismatches = 0
    for name, module in state.modules.items():
        lora_a, lora_b = _pad(factors[name], r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b
        merged = base[name] + (lora_b @ lora_a).T  # what PEFT's merge computes, in float32, (in, out)
        master = weights.masters[name].to("cpu", torch.float32)
        mismatches += int((merged != master).sum())
        reference[name] = stored_form(module, master, state.dtype)
        candidate[name] = stored_form(module, merged, state.dtype)
    ids = probe_ids if probe_ids is not None else probe_token_ids(loaded.tokenizer)
    error = logit_error(loaded.model, reference, candidate, ids)
    info = {
        "format": ExportFormat.PEFT.value,
        "version": weights.version,
        "weights_sha256": weights.weights_sha256,
        "base_fingerprint": loaded.fingerprint,
        "edited_modules": state.module_names,
        "source": loaded.source,
        "rank": r,
        "truncated": truncate is not None,
        "scaling": 1.0,
        "modules": {
            name: {"numerical_rank": f.numerical_rank, "relative_error": f.relative_error}
            for name, f in factors.items()
        },
        "merged_mismatches": mismatches,
        "logit_error": asdict(error) | {"dtype": str(state.dtype), "prompts_text": list(PROBE_PROMPTS)}
        if probe_ids is None
        else asdict(error) | {"dtype": str(state.dtype)},
    }
    with staged_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return AdapterInfo(
        out_dir, weights.version, weights.weights_sha256, r, truncate is not None, len(factors), error, mismatches
    )
