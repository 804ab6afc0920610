"""`EditorConfig.key_covariance`: the key statistics, the solve through them, training and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.checkpoint import build_editor, checkpoint_info, load_checkpoint, save_checkpoint
from editing.engine.deltas import apply, master_copies
from editing.engine.emsedit import EMSEditor
from editing.engine.key_covariance import key_second_moments, reference_texts
from editing.engine.synthetic import synthetic_examples
from editing.engine.training import TrainingOptions, meta_train
from editing.errors import CheckpointError, EditingError
from editing.model.loading import model_fingerprint
from editing.model.targets import weight_in_out
from editing.model.tracing import trace_modules

CONFIG = EditorConfig(rank=4, n_blocks=2, edit_lr=1e-2, steps=2)


def test_reference_texts_go_fact_by_fact_without_duplicates_up_to_the_limit() -> None:
    facts = [
        EditExample("p1", "a", rephrase_prompts=("r1",), locality=(("l1", "x"),)),
        EditExample("p2", "b", rephrase_prompts=("r2", "p1"), locality=(("l1", "x"), ("l2", "y"))),
    ]
    assert reference_texts(facts) == ["p1", "r1", "l1", "p2", "r2", "l2"]
    assert reference_texts(facts, limit=4) == ["p1", "r1", "l1", "p2"]


def test_key_second_moments_are_the_mean_outer_product_of_every_token_key(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = engine_tiny_lm("llama")
    editor = EMSEditor(model, bpe_tokenizer, names, CONFIG)
    texts = ["The capital of France is", "Who sang nice day?", "a b"]
    moments = key_second_moments(model, bpe_tokenizer, editor.modules, texts, batch_size=2)
    # the same statistic from each text alone, unpadded
    keys: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad(), trace_modules(editor.modules) as trace:
        for text in texts:
            ids = torch.tensor([bpe_tokenizer(text)["input_ids"]])
            trace.select = torch.ones_like(ids, dtype=torch.bool)
            model(input_ids=ids)
            for name in names:
                keys[name].append(trace.keys[name].pop())
    for name in names:
        u = torch.cat(keys[name]).float()
        torch.testing.assert_close(moments[name], u.T @ u / u.shape[0], rtol=1e-4, atol=1e-5)
        assert moments[name].shape == (weight_in_out(editor.modules[name]).shape[0],) * 2


def test_the_covariance_term_keeps_reference_keys_still(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = engine_tiny_lm("llama")
    facts = synthetic_examples(24, seed=3)
    plain = EMSEditor(model, bpe_tokenizer, names, CONFIG)
    kept = EMSEditor(model, bpe_tokenizer, names, CONFIG.model_copy(update={"key_covariance": 1e3}))
    others = reference_texts(facts[8:])
    kept.set_key_moments(key_second_moments(model, bpe_tokenizer, kept.modules, others))
    plan_plain, plan_kept = plain.propose(facts[:4]), kept.propose(facts[:4])
    # Σ ‖u ΔW‖² over the reference keys, i.e. tr(ΔWᵀ C ΔW): what the term penalises
    for name in names:
        c = kept.key_moments[name]
        moved = {label: float(torch.trace(p.deltas[name].T @ c @ p.deltas[name])) for label, p in
                 (("plain", plan_plain), ("kept", plan_kept))}
        assert moved["kept"] < 0.5 * moved["plain"], moved
    # γ = 0 with statistics present is the plain solve
    off = EMSEditor(model, bpe_tokenizer, names, CONFIG)
    off.set_key_moments(kept.key_moments)
    plan_off = off.propose(facts[:4])
    assert all(torch.equal(plan_off.deltas[n], plan_plain.deltas[n]) for n in names)


def test_without_statistics_the_option_is_refused_clearly(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = engine_tiny_lm("llama")
    editor = EMSEditor(model, bpe_tokenizer, names, CONFIG.model_copy(update={"key_covariance": 10.0}))
    with pytest.raises(EditingError, match="no key statistics"):
        editor.propose(synthetic_examples(2, seed=0))
    with pytest.raises(ValueError, match="modules"):
        editor.set_key_moments({names[0]: torch.eye(64)})
    with pytest.raises(ValueError, match="shape"):
        editor.set_key_moments({name: torch.eye(3) for name in names})


def test_training_measures_the_statistics_on_the_model_it_was_given_and_the_checkpoint_keeps_them(
    tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = engine_tiny_lm("llama")
    facts = synthetic_examples(16, seed=5)
    editor = EMSEditor(model, bpe_tokenizer, names, CONFIG.model_copy(update={"key_covariance": 100.0}))
    expected = key_second_moments(model, bpe_tokenizer, editor.modules, reference_texts(facts))
    meta_train(editor, facts, TrainingOptions(n_batches=2, batch_size=8))
    assert set(editor.key_moments) == set(names)
    for name in names:
        torch.testing.assert_close(editor.key_moments[name], expected[name])

    fingerprint = model_fingerprint(model)
    save_checkpoint(tmp_path, editor, checkpoint_info(editor, fingerprint, "llama", {}))
    checkpoint = load_checkpoint(tmp_path)
    # γ is a run-time setting: another value uses the saved statistics without retraining
    loaded = build_editor(model, bpe_tokenizer, fingerprint, checkpoint, EditorConfig(key_covariance=10.0))
    assert all(torch.equal(loaded.key_moments[n], editor.key_moments[n]) for n in names)
    before = master_copies(model, names)
    apply(model, loaded.propose(facts[:2]).deltas, master_copies(model, names))
    assert any(not torch.equal(before[n], master_copies(model, names)[n]) for n in names)

    # an editor trained without the term has no statistics: asking for it at load time fails early
    plain = EMSEditor(model, bpe_tokenizer, names, CONFIG)
    save_checkpoint(tmp_path / "plain", plain, checkpoint_info(plain, model_fingerprint(model), "llama", {}))
    with pytest.raises(CheckpointError, match="no key statistics"):
        build_editor(model, bpe_tokenizer, model_fingerprint(model), load_checkpoint(tmp_path / "plain"),
                     EditorConfig(key_covariance=10.0))
    assert not build_editor(model, bpe_tokenizer, model_fingerprint(model), load_checkpoint(tmp_path / "plain"),
                            EditorConfig()).key_moments
