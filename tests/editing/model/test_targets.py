"""The SmolLM2 (llama, 30 layers) entry of the target table is the measured choice and resolves on the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from editing.model.targets import TARGETS, default_edit_modules, resolve_modules, weight_in_out

CHOICE = Path(__file__).parents[3] / "bench" / "results" / "module_choice.json"


def _smollm2_shaped(layers: int = 30) -> LlamaForCausalLM:
    # SmolLM2-135M's shapes (hidden 576, MLP 1536, 30 layers) with a tiny vocabulary and attention
    config = LlamaConfig(
        vocab_size=8, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=16,
    )
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return LlamaForCausalLM(config)


def test_the_smollm2_entry_resolves_to_mlp_projections_of_that_model() -> None:
    names = default_edit_modules("llama", 30)
    modules = resolve_modules(_smollm2_shaped(), names)
    shapes = {tuple(weight_in_out(m).shape) for m in modules.values()}
    assert shapes <= {(576, 1536), (1536, 576)}
    assert len(names) == len(set(names)) >= 3


def test_the_smollm2_entry_is_the_one_the_module_choice_benchmark_recommends() -> None:
    entry = next(e for e in TARGETS if e.model_type == "llama" and e.num_layers == 30)
    assert "module_choice" in entry.reference
    if not CHOICE.exists():
        pytest.skip("bench/results/module_choice.json not generated yet")
    rows = json.loads(CHOICE.read_text())
    assert any(row["modules"] == default_edit_modules("llama", 30) for row in rows), (
        "the committed SmolLM2 modules must be among the measured candidates"
    )


def test_the_llama3_entry_is_unchanged_by_the_smollm2_entry() -> None:
    assert default_edit_modules("llama", 32)[0] == "model.layers.11.mlp.gate_proj"
