"""The edit memory behind `EditorConfig.preserve_edits`: G = Σ KᵀK over the keys of every committed edit.

With β = `preserve_edits` > 0 every step's ridge solve becomes

    ΔW = (KᵀK + λI + γC + βG)⁻¹ KᵀV,

which adds the penalty β Σ ‖k ΔW‖² over the keys k of the edits already made, so a new edit keeps the edited
module's outputs at the earlier edits' keys where they are (the preservation of earlier edits in MEMIT's and
AlphaEdit's sequential solves). Without it, a stream of edits overwrites its own beginning: on SmolLM2 the first
batches of a 512-fact stream kept about half their efficacy (docs/evaluation.md, "The edit memory").

The keys remembered for an edit are those of its last step (captured at the answer-predicting positions on the
weights the last step saw, the closest to the committed ones).

State and exactness. G lives in the editor state (`memory_key(module)`, float64) next to the normaliser
statistics. A commit artefact does not store G (576² per module) but the edit's own keys, quantised to int16
with one power-of-two exponent per module (`rows_key`, `exponent_key`): their Gram QᵀQ is a matrix of integers
below 2⁵³, computed exactly in float64 in any summation order, and 4ᵉ scales it exactly. G grows by
elementwise float64 addition, which IEEE fixes bit for bit. So `remember` (at edit time) and
`replayed_state` (rebuilding a version from a snapshot and commits) give the same bits on any device and
thread count, and a revert restores the memory exactly. The quantisation (relative error about 3e-5 of a
module's largest key entry) changes what is remembered negligibly; the solve uses the quantised keys'
Gram, the one that is stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

MEMORY_PREFIX = "edit_memory/"
ROWS_PREFIX = "edit_memory_rows/"
EXPONENT_PREFIX = "edit_memory_exponent/"
#: the largest quantised magnitude: rows × INT16_MAX² stays below 2⁵³ for up to 2²³ rows per edit
INT16_MAX = 32767
MAX_ROWS = 1 << 23


def memory_key(module: str) -> str:
    """The editor-state key of a module's Gram G (float64, (d_in, d_in))."""
    return MEMORY_PREFIX + module


def rows_key(module: str) -> str:
    """The editor-state key of the last edit's quantised keys of a module (int16, (rows, d_in))."""
    return ROWS_PREFIX + module


def exponent_key(module: str) -> str:
    """The editor-state key of the power-of-two exponent of those keys (int64, 0-d)."""
    return EXPONENT_PREFIX + module


def is_memory_key(key: str) -> bool:
    """Whether an editor-state key belongs to the edit memory (and not to the hypernetworks' statistics)."""
    return key.startswith((MEMORY_PREFIX, ROWS_PREFIX, EXPONENT_PREFIX))


def quantise_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (rows, d_in) as int16 values Q and one exponent e with keys ≈ Q · 2^e (the largest entry ↦ ±2¹⁴…2¹⁵)."""
    if keys.shape[0] > MAX_ROWS:
        raise ValueError(f"{keys.shape[0]} key rows in one edit; the exact Gram allows at most {MAX_ROWS}")
    peak = float(keys.detach().abs().max()) if keys.numel() else 0.0
    if not math.isfinite(peak):
        raise ValueError("the captured keys are not finite")
    if peak == 0.0:
        return torch.zeros(keys.shape, dtype=torch.int16), torch.tensor(0, dtype=torch.int64)
    exponent = math.ceil(math.log2(peak / INT16_MAX))  # the smallest e with peak / 2^e ≤ INT16_MAX
    scaled = keys.detach().double().cpu() * 2.0 ** (-exponent)
    quantised = scaled.round().clamp(-INT16_MAX, INT16_MAX).to(torch.int16)
    return quantised, torch.tensor(exponent, dtype=torch.int64)


def exact_gram(quantised: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """QᵀQ · 4^e in float64, exact: every entry is an integer sum below 2⁵³ times a power of two."""
    q = quantised.to(torch.float64)
    gram = q.T @ q
    return gram * 2.0 ** (2 * int(exponent))


def remember(state: Mapping[str, torch.Tensor], keys: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The edit-memory part of the state after an edit with these last-step keys (module -> (rows, d_in)).

    Returns every module's G (grown by the exact Gram of the quantised keys for the modules in `keys`) and
    this edit's quantised keys (what a commit artefact stores instead of G); the previous edit's keys are
    not carried over, so a replay never adds them twice.
    """
    out = {key: value for key, value in state.items() if key.startswith(MEMORY_PREFIX)}
    for module, rows in keys.items():
        quantised, exponent = quantise_keys(rows)
        gram = exact_gram(quantised, exponent)
        previous = out.get(memory_key(module))
        out[memory_key(module)] = gram if previous is None else previous.to(torch.float64).cpu() + gram
        out[rows_key(module)] = quantised
        out[exponent_key(module)] = exponent
    return out


def memory(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> G from an editor state (modules nothing was remembered for are absent)."""
    return {key[len(MEMORY_PREFIX) :]: value for key, value in state.items() if key.startswith(MEMORY_PREFIX)}


def stored_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a commit artefact keeps of the editor state after the commit: everything but the Grams G."""
    return {key: value for key, value in state.items() if not key.startswith(MEMORY_PREFIX)}


def replayed_state(previous: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The editor state after a commit, rebuilt from the state before it and what its artefact stored.

    The statistics are the stored ones; each G is the previous one plus the exact Gram of the stored keys
    (the same arithmetic as `remember`, so the bits agree). A commit that stored no state (its editor kept
    its statistics frozen and remembered nothing) leaves the previous state.
    """
    if not stored:
        return dict(previous)
    out = {key: value for key, value in stored.items() if not key.startswith((ROWS_PREFIX, EXPONENT_PREFIX))}
    # Grams carry over from the previous state; modules this commit remembered keys for grow.
    out |= {key: value for key, value in previous.items() if key.startswith(MEMORY_PREFIX)}
    for key, quantised in stored.items():
        if not key.startswith(ROWS_PREFIX):
            continue
        module = key[len(ROWS_PREFIX) :]
        gram = exact_gram(quantised, stored[exponent_key(module)])
        before = out.get(memory_key(module))
        out[memory_key(module)] = gram if before is None else before + gram
        out[key] = quantised
        out[exponent_key(module)] = stored[exponent_key(module)]
    return out
