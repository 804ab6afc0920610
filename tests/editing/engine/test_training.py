"""Meta-training: on a tiny model it makes edits work; the quirk options do what they say."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.deltas import apply, restore
from editing.engine.emsedit import EMSEditor
from editing.engine.synthetic import synthetic_examples
from editing.engine.training import TrainingOptions, meta_train
from editing.model.edit_metrics import token_accuracy

QUICK = TrainingOptions(n_batches=8, batch_size=8, epochs=3, meta_lr=1e-2, l2_coef=0.0, single_adam_step=False)


def _editor(engine_tiny_lm: Any, tokenizer: Any, mode: str = "batch", steps: int = 2) -> EMSEditor:
    model, names = engine_tiny_lm("llama", seed=0)
    torch.manual_seed(0)
    config = EditorConfig(rank=8, n_blocks=2, edit_lr=1e-2, mode=mode, steps=steps, lm_batch_size=8)  # type: ignore[arg-type]
    return EMSEditor(model, tokenizer, names, config)


def _edit_accuracy(editor: EMSEditor, facts: list[EditExample]) -> float:
    """Teacher-forced token accuracy of the new targets after editing them (ES), model restored after."""
    saved = apply(editor.model, editor.propose(facts))
    try:
        batch = editor.tokenise(facts)
        with torch.no_grad():
            logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return float(token_accuracy(logits, batch.labels).mean())
    finally:
        restore(editor.model, saved)


@pytest.fixture(scope="module")
def facts() -> list[EditExample]:
    return synthetic_examples(64, seed=0)


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_meta_training_makes_the_edited_facts_accuracy_rise(
    mode: str, facts: list[EditExample], engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, mode)
    weights = {n: p.clone() for n, p in editor.model.named_parameters()}
    untrained = _edit_accuracy(editor, facts[:8])
    report = meta_train(editor, facts, QUICK)
    trained = _edit_accuracy(editor, facts[:8])
    assert untrained < 0.1 and trained > untrained + 0.3, (untrained, trained)
    assert all(torch.equal(p, weights[n]) for n, p in editor.model.named_parameters()), "training restores the LM"
    assert len(report.edit_losses) == 3 * 8


def test_one_adam_step_per_epoch_with_the_reference_schedule(
    facts: list[EditExample], engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, "sequential")
    lr_before = editor.nets.net(1, editor.module_names[0])[0].lr.weight.clone()
    options = replace(QUICK, n_batches=3, epochs=1, single_adam_step=True, meta_lr=1e-5)
    report = meta_train(editor, facts, options)
    assert report.optimiser_steps == 1
    moved = (editor.nets.net(1, editor.module_names[0])[0].lr.weight - lr_before).abs()
    assert torch.allclose(moved, torch.full_like(moved, 1e-5), rtol=0.05), "one Adam step moves η by about meta_lr"


def test_duplicate_parameters_double_the_updates_in_batch_mode(
    facts: list[EditExample], engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    options = replace(QUICK, n_batches=1, epochs=1)
    plain = meta_train(_editor(engine_tiny_lm, bpe_tokenizer, "batch"), facts, options)
    doubled = meta_train(_editor(engine_tiny_lm, bpe_tokenizer, "batch"), facts, replace(options, duplicate_params=True))
    assert (plain.optimiser_steps, doubled.optimiser_steps) == (2, 4)


def test_kl_locality_and_backtracking_change_the_training(
    facts: list[EditExample], engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    base = replace(QUICK, n_batches=2, epochs=1)
    results = []
    for options in (base, replace(base, locality="kl", loc_coef=5.0), replace(base, back_depth=2)):
        editor = _editor(engine_tiny_lm, bpe_tokenizer, "sequential", steps=1)
        meta_train(editor, facts, options)
        results.append(editor.nets.net(1, editor.module_names[0])[0].lr.weight.clone())
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_too_few_examples_is_an_error(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="fewer than one training batch"):
        meta_train(_editor(engine_tiny_lm, bpe_tokenizer), synthetic_examples(3, seed=0), QUICK)
