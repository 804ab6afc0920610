"""Self-describing checkpoints: round trip, refusal for another model or module set, the training CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_editor,
    checkpoint_info,
    load_checkpoint,
    save_checkpoint,
)
from editing.engine.edit_memory import is_memory_key
from editing.engine.emsedit import EMSEditor
from editing.errors import CheckpointError, ModelMismatch
from editing.model.loading import model_fingerprint

FACTS = [EditExample("The capital of France is", "Rome"), EditExample("Who sang nice day?", "Walter Sobchak")]


def _trained_like_editor(engine_tiny_lm: Any, tokenizer: Any) -> EMSEditor:
    model, names = engine_tiny_lm("llama")
    editor = EMSEditor(model, tokenizer, names, EditorConfig(rank=4, n_blocks=2, edit_lr=1e-2, steps=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in editor.nets.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # not the initial values, so a round trip is meaningful
    editor.adopt_state(editor.propose(FACTS))
    return editor


def test_round_trip_gives_the_same_edits_and_describes_itself(
    tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _trained_like_editor(engine_tiny_lm, bpe_tokenizer)
    fingerprint = model_fingerprint(editor.model)
    info = checkpoint_info(editor, fingerprint, "llama", {"data": "synthetic:8", "data_hash": "abc"})
    save_checkpoint(tmp_path, editor, info)
    described = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert described["model_fingerprint"] == fingerprint and described["steps"] == 2 and described["rank"] == 4
    assert described["modules"] == {name: [128, 64] for name in editor.module_names}
    assert described["training"]["data_hash"] == "abc" and described["code_version"]

    loaded = build_editor(editor.model, bpe_tokenizer, fingerprint, load_checkpoint(tmp_path), EditorConfig(rank=999))
    assert loaded.config.rank == 4, "the network shape comes from the checkpoint"
    assert all(torch.equal(loaded.edit_state()[k], v) for k, v in editor.nets.normaliser_state().items())
    # the edit memory belongs to the edited model's history (its artefacts), not to the trained editor
    assert not any(is_memory_key(k) for k in loaded.edit_state()) and any(is_memory_key(k) for k in editor.edit_state())
    loaded.load_edit_state(editor.edit_state())
    first, second = editor.propose(FACTS), loaded.propose(FACTS)
    assert all(torch.equal(first.deltas[n], second.deltas[n]) for n in editor.module_names)


def test_another_model_or_module_set_is_refused_with_a_clear_message(
    tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _trained_like_editor(engine_tiny_lm, bpe_tokenizer)
    save_checkpoint(tmp_path, editor, checkpoint_info(editor, model_fingerprint(editor.model), "llama", {}))
    checkpoint = load_checkpoint(tmp_path)
    other, _ = engine_tiny_lm("llama", seed=1)
    with pytest.raises(ModelMismatch, match=r"trained for another model.*python -m editing\.train"):
        build_editor(other, bpe_tokenizer, model_fingerprint(other), checkpoint, EditorConfig())
    with pytest.raises(ModelMismatch, match="trained for another model"):  # an earlier name of another model
        build_editor(other, bpe_tokenizer, "new", checkpoint, EditorConfig(), earlier_fingerprints=("older",))
    # an editor trained under an earlier version of this code, which fingerprinted the same model otherwise
    upgraded = build_editor(
        editor.model, bpe_tokenizer, "new", checkpoint, EditorConfig(),
        earlier_fingerprints=(model_fingerprint(editor.model),),
    )
    assert upgraded.module_names == editor.module_names
    with pytest.raises(ModelMismatch, match="other modules than configured"):
        build_editor(
            editor.model, bpe_tokenizer, model_fingerprint(editor.model), checkpoint, EditorConfig(),
            module_names=["model.layers.0.mlp.up_proj"],
        )


def test_missing_or_broken_files_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing.*python -m editing\.train"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    (tmp_path / WEIGHTS_FILE).write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)


def test_training_cli_writes_a_checkpoint_that_loads(
    tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    from editing.train import main

    model, names = engine_tiny_lm("llama")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nsource = "{model_dir}"\ndevice = "cpu"\nedit_modules = {json.dumps(names)}\n')
    out = tmp_path / "editor"
    argv = ["--config", str(config), "--state-dir", str(tmp_path / "state"), "--data", "synthetic:32"]
    argv += ["--output", str(out), "--rank", "4", "--n-blocks", "1", "--batch-size", "8", "--n-batches", "2"]
    argv += ["--no-single-adam-step", "--meta-lr", "1e-3", "--no-progress"]
    assert main(argv) == 0
    info = json.loads((out / CONFIG_FILE).read_text())
    assert info["training"]["data"] == "synthetic:32" and info["training"]["optimiser_steps"] == 2
    assert info["training"]["options"]["single_adam_step"] is False
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    editor = build_editor(reloaded, bpe_tokenizer, model_fingerprint(reloaded), load_checkpoint(out), EditorConfig())
    assert editor.module_names == names


def test_training_cli_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from editing.train import main

    config = tmp_path / "config.toml"
    config.write_text("[editor]\nsteps = 0\n")
    assert main(["--config", str(config), "--state-dir", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err
