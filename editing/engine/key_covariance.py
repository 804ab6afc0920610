"""The key statistics behind `EditorConfig.key_covariance`: C = E[u uᵀ] of each edited module's input.

With γ = `key_covariance` > 0 every step's ridge solve becomes MEMIT's preserving form

    ΔW = (KᵀK + λI + γ C)⁻¹ KᵀV,   C = E[u uᵀ] over every token of reference texts on the unedited model,

which penalises γ Σ ‖u ΔW‖² over typical keys u, so an edit is pushed towards directions that ordinary text
does not use and moves unrelated prompts less. C is the full second moment of the keys of *other* text (the
training facts' prompts, paraphrases and unrelated prompts), measured once when the editor is trained
(`editing.engine.training.meta_train`) and saved with it; `EditorConfig.preserve_keys` instead builds a diagonal
estimate from the *edited* keys, which penalises the edit directions themselves as much as anything else.
docs/editor.md and docs/evaluation.md report what each measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from editing.data import EditExample
from editing.engine.emsedit import input_device
from editing.model.tokenise import pad_id
from editing.model.tracing import trace_modules

#: the most reference texts the statistics are measured on (the first ones, in training order)
MAX_TEXTS = 4096


def reference_texts(examples: Sequence[EditExample], limit: int = MAX_TEXTS) -> list[str]:
    """The prompts of `examples`, fact by fact (edit prompt, paraphrases, unrelated prompts), without
    duplicates: the first `limit` of them, so a long training file is cut without losing any kind."""
    texts = (text for e in examples for text in (e.prompt, *e.rephrase_prompts, *(p for p, _ in e.locality)))
    return list(dict.fromkeys(texts))[:limit]


@torch.no_grad()
def key_second_moments(
    model: nn.Module, tokenizer: Any, modules: dict[str, nn.Module], texts: Sequence[str], batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """E[u uᵀ] (d_in, d_in, float32, on the CPU) of each module's input over every non-padding token of `texts`.

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
                keys = trace.keys[name].pop().float()  # (tokens, d_in)
                sums[name] = sums[name] + keys.T @ keys if name in sums else keys.T @ keys
    return {name: (total / count).cpu() for name, total in sums.items()}
