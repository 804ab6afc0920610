"""An experimental EMSEdit variant for the retention study: a MEMIT-style key-covariance term in the solve.

    ΔW = (KᵀK + λI + γ C)⁻¹ KᵀV,   C = E[u uᵀ] over every token of reference texts on the unedited model

`EditorConfig.preserve_keys` adds γ (diag(var) + μμᵀ) built from the editor's running statistics, i.e. from
the *edited* prompts' keys, which penalises the edit directions themselves as much as anything else. Here C
is the full second-moment matrix of the keys of other text (the training facts' prompts, paraphrases and
unrelated prompts), so the solve is pushed towards directions that ordinary text does not use. This is an
option of the evaluation (`key_covariance` of a method), not of the editor: docs/evaluation.md reports
what it measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from editing.config import EditorConfig
from editing.data import EditExample
from editing.emsedit import EMSEditor, input_device
from editing.hypernet import EditorNets
from editing.solve import ridge_solve
from editing.tokenise import pad_id
from editing.tracing import trace_modules


def reference_texts(examples: Sequence[EditExample]) -> list[str]:
    """Every prompt of `examples` (edit prompts, paraphrases, unrelated prompts), without duplicates."""
    texts = [e.prompt for e in examples]
    texts += [p for e in examples for p in e.rephrase_prompts]
    texts += [p for e in examples for p, _ in e.locality]
    return list(dict.fromkeys(texts))


@torch.no_grad()
def key_second_moments(
    model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], texts: Sequence[str], batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """E[u uᵀ] (d_in, d_in, float32) of each module's input over every non-padding token of `texts`.

    Texts are tokenised one by one (with the tokenizer's special tokens) and right-padded here, so the
    tokenizer's own padding side does not matter.
    """
    if not texts:
        raise ValueError("key_second_moments needs at least one text")
    sums: dict[str, torch.Tensor] = {}
    count = 0
    device = input_device(model)
    with trace_modules(modules) as trace:
        for start in range(0, len(texts), batch_size):
            rows = [tokenizer(text)["input_ids"] for text in texts[start : start + batch_size]]
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[b, : len(row)] = True
            trace.select = mask
            model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
            count += int(mask.sum())
            for name in modules:
                keys = trace.keys[name].pop()  # (tokens, d_in)
                sums[name] = sums[name] + keys.T @ keys if name in sums else keys.T @ keys
    return {name: total / count for name, total in sums.items()}


class CovarianceEditor(EMSEditor):
    """EMSEdit with `weight` · C added to every step's ridge system (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        module_names: Sequence[str],
        config: EditorConfig,
        second_moments: dict[str, torch.Tensor],
        weight: float,
        nets: EditorNets | None = None,
    ) -> None:
        super().__init__(model, tokenizer, module_names, config, nets)
        missing = set(self.modules) - set(second_moments)
        if missing:
            raise ValueError(f"no key covariance for modules {sorted(missing)}")
        self.priors = {name: weight * second_moments[name].to(self.device) for name in self.modules}

    def module_delta(self, step: int, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        net, idx = self.nets.net(step, name)
        values = net.values(keys, grads, idx)
        return ridge_solve(keys, values, net.ridge(idx), self.config.solve_form, self.priors[name])
