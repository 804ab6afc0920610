"""UltraEdit: training-free lifelong editing with lifelong-normalised gradients and a closed-form solve.

Spec §4.5. There is no learned network: per edited weight shape a running mean/std over z = [u; δ]
that keeps learning from every edit ("lifelong normalisation"), the normalised key û and gradient δ̂,
the value changes

    v_i = −η ‖û_i‖² δ̂_i

and ΔW = (KᵀK + λI)⁻¹ KᵀV with raw keys K and λ = 1, as in the reference. η is fixed; the reference's
1e-6 was set for Llama-3 and edits nothing on a small model, so it is a constructor argument chosen on
training facts (docs/evaluation.md).

The editor reuses EMSEdit's capture, stepping and apply/restore machinery (`EMSEditor`) with
hypernetworks of zero blocks, which are exactly the normaliser; only the value formula differs
(EMSEdit scales δ̃ by ⟨u, ũ⟩ with a raw u, UltraEdit by ‖û‖²). Nothing here is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from editing.config import EditorConfig
from editing.engine.emsedit import EMSEditor
from editing.engine.hypernet import EditorNets
from editing.engine.solve import ridge_solve
from editing.model.targets import resolve_modules, weight_in_out

DEFAULT_LR = 3e-4  # chosen on zsre_train facts for SmolLM2 (docs/evaluation.md)


def ultraedit_config(base: EditorConfig | None = None, *, lr: float = DEFAULT_LR, steps: int = 1) -> EditorConfig:
    """An EditorConfig for UltraEdit: sequential mode (a normaliser per step), never-frozen statistics, no edit
    memory (UltraEdit's fixed solve has none)."""
    base = base or EditorConfig()
    return base.model_copy(update={"steps": steps, "mode": "sequential", "edit_lr": lr, "freeze_normaliser": False, "preserve_edits": 0.0})


class UltraEditor(EMSEditor):
    """UltraEdit for the named modules of `model`: `propose(examples)` -> `EditPlan` (see module docstring).

    The ridge coefficient is λ = exp(0) = 1 and η is `config.edit_lr`; both stay fixed, since nothing
    is trained. `config.steps` > 1 repeats the edit on the updated weights (the reference uses one).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, module_names: Sequence[str], config: EditorConfig) -> None:
        modules = resolve_modules(model, list(module_names))
        shapes = {name: (int(weight_in_out(m).shape[0]), int(weight_in_out(m).shape[1])) for name, m in modules.items()}
        nets = EditorNets(shapes, config.steps, rank=1, n_blocks=0, lr=config.edit_lr, shared=False)
        super().__init__(model, tokenizer, module_names, config, nets)

    def module_delta(self, step: int, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """ΔW (d_in, d_out) = (KᵀK + I)⁻¹ Kᵀ V with v_i = −η ‖û_i‖² δ̂_i."""
        net, idx = self.nets.net(step, name)
        norm_keys, norm_grads = net(keys, grads, idx)  # zero blocks: the normalised [u; δ], split
        values = -net.step_size(idx) * norm_keys.square().sum(-1, keepdim=True) * norm_grads
        return ridge_solve(keys, values, net.ridge(idx), self.config.solve_form)
