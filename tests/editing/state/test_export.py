"""Export to a plain Hugging Face directory: same logits as the daemon's model, at the live or an older version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from editing.model.loading import LoadedModel, model_fingerprint
from editing.state.export import EXPORT_INFO_NAME, WEIGHTS_NAME, ExportError, export_model
from editing.state.history import CommitRef, ModelHistory, prepare_commit
from editing.state.weights import WeightState
from store.artefacts import ArtefactStore


def _loaded(model: torch.nn.Module, tokenizer: Any) -> LoadedModel:
    return LoadedModel(model, tokenizer, "tiny", None, model_fingerprint(model))


def _low_rank(state: WeightState, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, base in state.base().items():
        d_in, d_out = base.shape
        out[name] = scale * torch.randn(d_in, 3, generator=gen) @ torch.randn(3, d_out, generator=gen)
    return out


def _logits(model: torch.nn.Module, tokenizer: Any, text: str = "The capital of France is Paris.") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def _commit_some(state: WeightState, tmp_path: Path, count: int) -> tuple[ModelHistory, dict[int, CommitRef]]:
    history = ModelHistory(state, ArtefactStore(tmp_path / "artefacts"))
    refs: dict[int, CommitRef] = {}
    history.open(refs)
    for version in range(1, count + 1):
        prepared = prepare_commit(_low_rank(state, version), {})
        history.commit(
            prepared,
            version=version,
            record=lambda r: refs.__setitem__(r.version, CommitRef(r.version, r.parent, r.artefact_sha256, r.weights_sha256)),
        )
    return history, refs


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: Conv1D orientation and tied embeddings
def test_export_loads_in_plain_transformers_with_the_same_logits(
    model_type: str, engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path
) -> None:
    model, names = engine_tiny_lm(model_type)
    base_logits = _logits(model, bpe_tokenizer)
    state = WeightState(model, names)
    _commit_some(state, tmp_path, 2)
    edited = _logits(model, bpe_tokenizer)
    assert not torch.equal(edited, base_logits)  # the edits reach the logits, so equality below means something

    info = export_model(_loaded(model, bpe_tokenizer), state, tmp_path / "export")

    assert (info.out_dir / WEIGHTS_NAME).is_file() and (info.out_dir / EXPORT_INFO_NAME).is_file()
    assert info.version == 2 and info.weights_sha256 == state.weights_sha256()
    reloaded = AutoModelForCausalLM.from_pretrained(info.out_dir).eval()
    assert torch.equal(_logits(reloaded, bpe_tokenizer), edited)
    if model_type == "gpt2":
        assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_export_of_an_older_version_matches_the_model_reverted_to_it(
    engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path
) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    history, refs = _commit_some(state, tmp_path, 3)
    staged, _, _ = history.stage_version(1, refs)

    info = export_model(_loaded(model, bpe_tokenizer), state, tmp_path / "v1", staged=staged)
    assert state.version == 3  # exporting an older version leaves the live model alone

    history.revert_to(1, refs, record=lambda: None)
    reloaded = AutoModelForCausalLM.from_pretrained(info.out_dir).eval()
    assert info.version == 1 and info.weights_sha256 == refs[1].weights_sha256
    assert torch.equal(_logits(reloaded, bpe_tokenizer), _logits(model, bpe_tokenizer))


def test_export_refuses_a_non_empty_directory_and_leaves_no_temporary_files(
    engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path
) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_model(_loaded(model, bpe_tokenizer), state, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.real_model
def test_export_of_edited_smollm2_gives_the_same_logits(default_model: Any, tmp_path: Path) -> None:
    from editing.model.targets import default_edit_modules

    model = default_model.model
    names = default_edit_modules(default_model.model_type, default_model.num_layers)
    state = WeightState(model, names)
    history = ModelHistory(state, ArtefactStore(tmp_path / "artefacts"))
    refs: dict[int, CommitRef] = {}
    history.open(refs)
    try:
        prepared = prepare_commit(_low_rank(state, 7, scale=0.02), {})
        history.commit(prepared, version=1, record=lambda r: refs.__setitem__(1, CommitRef(1, 0, r.artefact_sha256, r.weights_sha256)))
        edited = _logits(model, default_model.tokenizer)
        info = export_model(default_model, state, tmp_path / "smollm2")
        reloaded = AutoModelForCausalLM.from_pretrained(info.out_dir, dtype=torch.float32).eval()
        assert torch.equal(_logits(reloaded, default_model.tokenizer), edited)
    finally:  # the model is shared by the whole session: put the base weights back exactly
        history.revert_to(0, refs, record=lambda: None)
