"""Fixtures shared by the tests of `editing/` (add fixtures with distinct names; never rename others').

- `bpe_tokenizer`: a small byte-level BPE tokenizer (GPT-2/Llama-3 style leading-space tokens) that adds
  a BOS token, trained locally in milliseconds; no download.
- `gate_tiny_lm`: a factory `(model_type, seed) -> nn.Module` of tiny random causal LMs ("llama", "gpt2")
  sized for `bpe_tokenizer`, in eval mode with gradients off (the gate's tests).
- `engine_tiny_lm`: a factory `(model_type, seed, dtype) -> (model, edited module names)` of tiny random
  causal LMs ("llama", "gpt2", "gptj", "gpt_neox", "qwen2") for `bpe_tokenizer` (the EMSEdit engine's tests).
- `engine_single_thread`: run a test with one torch thread (tiny models are far faster so on a busy CPU).
"""

from __future__ import annotations

from typing import Any

import pytest

_BPE_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The mother tongue of Anna Berg is Swedish.",
    "Lionel Messi plays the sport of football. Danielle Okafor is employed by Google. Who sang nice day?",
    "nq question: who wrote the book? Walter Sobchak was born in Berlin.",
    "The official language of Peru is Spanish.",
)


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Any:
    """A 400-token byte-level BPE tokenizer with <pad>=0, <bos>=1 (prepended to every text), <eos>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_BPE_CORPUS) * 5, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def gate_tiny_lm(bpe_tokenizer: Any) -> Any:
    """Build a tiny random causal LM of `model_type` ("llama" or "gpt2") for `bpe_tokenizer`; no download."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    def build(model_type: str = "llama", seed: int = 0) -> Any:
        vocab = len(bpe_tokenizer)
        if model_type == "llama":
            config: Any = LlamaConfig(
                vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
            )
        else:
            config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.eval()
        model.requires_grad_(False)
        return model

    return build


_ENGINE_MODULES = {
    "llama": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    "qwen2": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate_proj"],
    "gpt2": ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
    "gptj": ["transformer.h.0.mlp.fc_out", "transformer.h.1.mlp.fc_in"],
    "gpt_neox": ["gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_4h_to_h"],
}


@pytest.fixture(scope="session")
def engine_tiny_lm(bpe_tokenizer: Any) -> Any:
    """Build `(model, edited module names)`: a tiny random causal LM (hidden 64, 2 layers) for `bpe_tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, Qwen2Config

    def build(model_type: str = "llama", seed: int = 0, dtype: Any = None) -> tuple[Any, list[str]]:
        vocab, special = len(bpe_tokenizer), {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
        llama_like = {
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **special,
        }
        configs: dict[str, Any] = {
            "llama": lambda: LlamaConfig(**llama_like),
            "qwen2": lambda: Qwen2Config(**llama_like),
            "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **special),
            "gptj": lambda: GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, **special),
            "gpt_neox": lambda: GPTNeoXConfig(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, **special,
            ),
        }
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(configs[model_type]())
        if dtype is not None:
            model.to(dtype)
        model.eval()
        model.requires_grad_(False)
        return model, list(_ENGINE_MODULES[model_type])

    return build


@pytest.fixture
def engine_single_thread() -> Any:
    """One torch thread for the test, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
