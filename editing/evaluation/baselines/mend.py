"""MEND-style editing: per-token rank-one updates ũ δ̃ᵀ through a hypernetwork, summed, with no solve.

Spec §3. What makes it MEND rather than MALMEN:

- keys and output gradients are taken at every non-padding token (MEND's `all` token selection), not
  only at the answer-predicting positions;
- the update is the sum of the pseudo outer products, ΔW_l = −η_l Σ_i ũ_i δ̃_iᵀ, with a learned step
  size η_l and no least-squares aggregation. The sign is the paper's descent direction (the reference
  code adds the update, a bug its maintainer acknowledged; training would have to flip it);
- the normaliser statistics are learned in training only (frozen at edit time, as MEND's are).

The hypernetwork is this project's (`editing.engine.hypernet`, the MALMEN/EMSEdit block on the joint [u; δ])
rather than MEND's two-layer IDMLP with separate normalisers. Training reuses `editing.engine.training`
(batch mode, one optimiser step per training batch, MEND's KL locality loss); its decoupled
gradient ⟨G, ∂ΔW/∂θ⟩ is exact here, because u and δ are computed on the weights before the edit and
do not depend on the hypernetwork, so no backward pass through the edited LM is needed.
"""

from __future__ import annotations

import torch

from editing.config import EditorConfig
from editing.engine.emsedit import Captures, EMSEditor, answer_loss, lm_logits, split_batch
from editing.model.tokenise import TokenBatch
from editing.model.tracing import trace_modules

DEFAULT_LR = 1e-4  # chosen on zsre_train facts for SmolLM2 (docs/evaluation.md)


def mend_config(base: EditorConfig | None = None, *, lr: float = DEFAULT_LR) -> EditorConfig:
    """An EditorConfig for MEND-style editing: one step, one network, statistics frozen at edit time, no edit
    memory (MEND has no solve to add it to)."""
    base = base or EditorConfig()
    return base.model_copy(update={"steps": 1, "mode": "batch", "edit_lr": lr, "freeze_normaliser": True, "preserve_edits": 0.0})


class MENDEditor(EMSEditor):
    """MEND-style editor (see the module docstring); the interface is `EMSEditor`'s."""

    def capture(self, batch: TokenBatch) -> tuple[Captures, float]:
        """(K, D) per module at every non-padding position on the current weights, and the edit loss."""
        total = 0.0
        with torch.enable_grad(), trace_modules(self.modules) as trace:
            for chunk in split_batch(batch, self.config.lm_batch_size):
                trace.select = chunk.attention_mask.bool()
                logits = lm_logits(self.model, chunk)
                loss = answer_loss(logits, chunk.labels.to(logits.device))
                loss.backward()  # type: ignore[no-untyped-call]
                total += float(loss.detach())
        captures: Captures = {}
        for name in self.modules:
            keys, grads = trace.stacked(name)
            captures[name] = (keys.to(self.device), grads.to(self.device))
        return captures, total

    def module_delta(self, step: int, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """ΔW (d_in, d_out) = −η_j Σ_i ũ_i δ̃_iᵀ; differentiable in the hypernetwork's parameters."""
        net, idx = self.nets.net(step, name)
        pseudo_keys, pseudo_grads = net(keys, grads, idx)  # (N, d_in), (N, d_out)
        delta: torch.Tensor = -net.step_size(idx) * (pseudo_keys.T @ pseudo_grads)
        return delta
