"""Every architecture in the target table: tiny models built from configs (no download).

For each one the default edited modules exist, are Linear/Conv1D, and are seen in the (in, out)
orientation; the table scales to other depths; unknown architectures get an actionable error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from editing.errors import ModelMismatch
from editing.model.targets import (
    TARGETS,
    default_edit_modules,
    resolve_modules,
    supported_model_types,
    weight_in_out,
)

HIDDEN, MLP, VOCAB = 16, 32, 64


def _llama_like(cls: Callable[..., Any]) -> Callable[[int], Any]:
    def build(layers: int) -> Any:
        return cls(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=MLP,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=64,
        )

    return build


CONFIGS: dict[str, Callable[[int], Any]] = {
    "llama": _llama_like(LlamaConfig),
    "mistral": _llama_like(MistralConfig),
    "qwen2": _llama_like(Qwen2Config),
    "gemma2": _llama_like(Gemma2Config),
    "gpt2": lambda n: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=n, n_head=2, n_positions=64),
    "gptj": lambda n: GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=n, n_head=2, rotary_dim=4, n_positions=64),
    "gpt_neox": lambda n: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=n,
        num_attention_heads=2,
        max_position_embeddings=64,
    ),
}


def test_table_covers_the_required_architectures() -> None:
    assert set(CONFIGS) <= set(supported_model_types())


@pytest.mark.parametrize("entry", TARGETS, ids=lambda e: f"{e.model_type}-{e.num_layers}")
def test_default_modules_resolve_on_a_tiny_model(entry: Any) -> None:
    torch.manual_seed(0)
    config = CONFIGS[entry.model_type](entry.num_layers)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == entry.model_type
    names = default_edit_modules(entry.model_type, entry.num_layers)
    expected = [rule.template.format(i) for rule in entry.rules for i in rule.layers]
    assert names == expected
    modules = resolve_modules(model, names)
    for module in modules.values():
        w = weight_in_out(module)
        x = torch.randn(3, w.shape[0])
        # The (in, out) view must reproduce the module's own forward (bias aside).
        out = module(x) - (module.bias if getattr(module, "bias", None) is not None else 0)
        torch.testing.assert_close(out, x @ w)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_other_depths_are_scaled(model_type: str) -> None:
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type](4))
    names = default_edit_modules(model_type, 4)
    assert names and len(set(names)) == len(names)
    resolve_modules(model, names)


def test_unknown_architecture_and_missing_modules() -> None:
    with pytest.raises(ModelMismatch, match="edit_modules"):
        default_edit_modules("bert", 12)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](2))
    with pytest.raises(ModelMismatch, match="not found"):
        resolve_modules(model, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(ModelMismatch, match="no 2-D weight"):
        resolve_modules(model, ["model.layers.0.mlp"])
    with pytest.raises(ModelMismatch, match="only Linear and Conv1D"):
        resolve_modules(model, ["model.embed_tokens"])
