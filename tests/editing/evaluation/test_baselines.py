"""The MEND-style and UltraEdit baselines on tiny models: contracts, their formulas, and edits that work."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.deltas import apply, restore
from editing.engine.solve import ridge_solve
from editing.engine.synthetic import synthetic_examples
from editing.engine.training import TrainingOptions, meta_train
from editing.evaluation.baselines.mend import MENDEditor, mend_config
from editing.evaluation.baselines.ultraedit import UltraEditor, ultraedit_config
from editing.model.edit_metrics import evaluate_examples

FACTS = [
    EditExample("The capital of France is", "Rome", rephrase_prompts=("France has its capital in",)),
    EditExample("Lionel Messi plays the sport of", "hockey"),
    EditExample("The official language of Peru is", "Swedish"),
    EditExample("Danielle Okafor is employed by", "Walter Sobchak"),
]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _efficacy(model: Any, tokenizer: Any, facts: list[EditExample]) -> float:
    return evaluate_examples(model, tokenizer, facts).summary()["efficacy"]


def _ultra(engine_tiny_lm: Any, tokenizer: Any, lr: float) -> UltraEditor:
    model, names = engine_tiny_lm("llama", seed=0)
    return UltraEditor(model, tokenizer, names, ultraedit_config(EditorConfig(lm_batch_size=4), lr=lr))


def test_ultraedit_has_no_trainable_blocks_and_uses_its_formula(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    editor = _ultra(engine_tiny_lm, bpe_tokenizer, lr=0.5)
    assert all(len(editor.nets.net(1, name)[0].blocks) == 0 for name in editor.module_names)
    captures, _ = editor.capture(editor.tokenise(FACTS))
    name = editor.module_names[0]
    keys, grads = captures[name]
    editor.update_normalisers(1, captures)
    net, _ = editor.nets.net(1, name)
    z = (torch.cat([keys, grads], -1) - net.normaliser.mean) / (net.normaliser.std + torch.finfo(torch.float32).eps)
    u_hat, d_hat = z[:, : keys.shape[1]], z[:, keys.shape[1] :]
    expected = ridge_solve(keys, -0.5 * u_hat.square().sum(-1, keepdim=True) * d_hat, torch.tensor(1.0))
    torch.testing.assert_close(editor.step_deltas(1, captures)[name], expected)


def test_ultraedit_edits_without_training_and_leaves_the_model(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _ultra(engine_tiny_lm, bpe_tokenizer, lr=1e-1)
    before, state = _params(editor.model), editor.edit_state()
    plan = editor.propose(FACTS)
    assert all(torch.equal(p, before[n]) for n, p in editor.model.named_parameters()), "propose leaves the model"
    assert all(torch.equal(v, editor.edit_state()[k]) for k, v in state.items()), "and the statistics"
    assert plan.editor_state and any(not torch.equal(v, state[k]) for k, v in plan.editor_state.items())
    untouched = _efficacy(editor.model, bpe_tokenizer, FACTS)
    saved = apply(editor.model, plan)
    edited = _efficacy(editor.model, bpe_tokenizer, FACTS)
    restore(editor.model, saved)
    assert edited > untouched + 0.2, (untouched, edited)


def _mend(engine_tiny_lm: Any, tokenizer: Any, lr: float) -> MENDEditor:
    model, names = engine_tiny_lm("llama", seed=0)
    torch.manual_seed(0)
    return MENDEditor(model, tokenizer, names, mend_config(EditorConfig(rank=8, n_blocks=2, lm_batch_size=4), lr=lr))


def test_mend_captures_every_token_and_sums_outer_products(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    editor = _mend(engine_tiny_lm, bpe_tokenizer, lr=0.25)
    batch = editor.tokenise(FACTS)
    captures, _ = editor.capture(batch)
    name = editor.module_names[0]
    keys, grads = captures[name]
    assert keys.shape[0] == int(batch.attention_mask.sum()) > int(batch.answer_mask.sum())
    net, idx = editor.nets.net(1, name)
    pseudo_keys, pseudo_grads = net(keys, grads, idx)
    torch.testing.assert_close(editor.step_deltas(1, captures)[name], -0.25 * pseudo_keys.T @ pseudo_grads)
    assert editor.config.freeze_normaliser and editor.steps == 1 and editor.nets.shared


def test_mend_edits_and_meta_trains_on_a_tiny_model(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _mend(engine_tiny_lm, bpe_tokenizer, lr=1e-3)
    facts = synthetic_examples(32, seed=1)
    weights = _params(editor.model)
    lr_before = editor.nets.net(1, editor.module_names[0])[0].lr.weight.detach().clone()
    options = TrainingOptions(n_batches=0, batch_size=8, locality="kl", l2_coef=0.0, meta_lr=1e-3)
    report = meta_train(editor, facts, options)
    assert report.optimiser_steps == 4 and len(report.edit_losses) == 4
    assert all(torch.equal(p, weights[n]) for n, p in editor.model.named_parameters()), "training restores the LM"
    assert not torch.equal(editor.nets.net(1, editor.module_names[0])[0].lr.weight, lr_before), "η is learned"
    # untrained, with statistics never updated, the edit is a plain gradient step of size η: it works
    strong = _mend(engine_tiny_lm, bpe_tokenizer, lr=10.0)
    saved = apply(strong.model, strong.propose(FACTS))
    edited = _efficacy(strong.model, bpe_tokenizer, FACTS)
    restore(strong.model, saved)
    assert edited > _efficacy(strong.model, bpe_tokenizer, FACTS) + 0.2


@pytest.mark.parametrize("build", [mend_config, ultraedit_config])
def test_baseline_configs_keep_unrelated_settings(build: Any) -> None:
    base = EditorConfig(lm_batch_size=3, rank=7)
    config = build(base, lr=1e-4)
    assert config.lm_batch_size == 3 and config.rank == 7 and config.edit_lr == 1e-4 and config.steps == 1
