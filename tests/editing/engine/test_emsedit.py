"""The editor: `propose` leaves model and state untouched; S sequential steps; plans that apply cleanly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.deltas import apply, master_copies, restore
from editing.engine.emsedit import EMSEditor, answer_loss, fact_loss, lm_logits

FACTS = [
    EditExample("The capital of France is", "Rome", rephrase_prompts=("France has its capital in",)),
    EditExample("Lionel Messi plays the sport of", "hockey", rephrase_prompts=("The sport of Lionel Messi is",)),
    EditExample("The official language of Peru is", "Swedish", rephrase_prompts=("In Peru people speak",)),
    EditExample("Danielle Okafor is employed by", "Walter Sobchak", locality=(("The capital of Italy is", "Rome"),)),
]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _edit_loss(editor: EMSEditor) -> float:
    """The edit loss as the editor reports it: the mean cross-entropy per fact."""
    batch = editor.tokenise(FACTS)
    with torch.no_grad():
        return float(fact_loss(lm_logits(editor.model, batch), batch.labels)) / len(FACTS)


def _editor(engine_tiny_lm: Any, tokenizer: Any, model_type: str = "llama", **config: Any) -> EMSEditor:
    model, names = engine_tiny_lm(model_type, dtype=config.pop("dtype", None))
    return EMSEditor(model, tokenizer, names, EditorConfig(**{"rank": 8, "n_blocks": 2, "edit_lr": 1e-2, **config}))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_propose_leaves_the_model_bit_identical_and_the_state_unchanged(
    model_type: str, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, model_type)
    before, state = _params(editor.model), editor.edit_state()
    plan = editor.propose(FACTS)
    assert all(torch.equal(p, before[n]) for n, p in editor.model.named_parameters())
    assert all(torch.equal(editor.edit_state()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in editor.model.parameters())
    assert set(plan.deltas) == set(editor.module_names)
    assert all(d.dtype == torch.float32 for d in plan.deltas.values())
    # the edit's statistics travel with the plan (the normaliser is not frozen by default)
    assert any(not torch.equal(plan.editor_state[k], v) for k, v in state.items())


def test_the_fact_loss_weighs_every_fact_equally_whatever_its_length(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer)
    batch = editor.tokenise(FACTS)
    with torch.no_grad():
        logits = lm_logits(editor.model, batch)
        per_fact = [
            float(answer_loss(logits[i : i + 1], batch.labels[i : i + 1])) for i in range(len(FACTS))
        ]
        assert float(fact_loss(logits, batch.labels)) == pytest.approx(sum(per_fact), rel=1e-5)
        # the token mean weighs long answers more ("Walter Sobchak" has several tokens, "Rome" one)
        assert float(answer_loss(logits, batch.labels)) != pytest.approx(sum(per_fact) / len(FACTS), rel=1e-3)


def test_a_facts_edit_signal_does_not_depend_on_the_rest_of_the_batch(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    """δ of a fact's rows is the same alone and in a batch (the gate re-edits subsets when it bisects)."""
    editor = _editor(engine_tiny_lm, bpe_tokenizer)
    together, _ = editor.capture(editor.tokenise(FACTS))
    offset = 0
    for i, fact in enumerate(FACTS):
        alone, _ = editor.capture(editor.tokenise([fact]))
        for name in editor.module_names:
            keys, grads = alone[name]
            rows = slice(offset, offset + keys.shape[0])
            torch.testing.assert_close(keys, together[name][0][rows], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grads, together[name][1][rows], rtol=1e-3, atol=1e-7)
            assert grads.abs().sum() > 0, f"fact {i} has no gradient on {name}"
        offset += alone[editor.module_names[0]][0].shape[0]
    assert offset == together[editor.module_names[0]][0].shape[0]


def test_a_facts_strength_scales_its_edit_signal_and_nothing_else(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    """The gate retries a fact that failed efficacy with a larger strength: its δ rows scale, the others stay."""
    editor = _editor(engine_tiny_lm, bpe_tokenizer)
    plain, _ = editor.capture(editor.tokenise(FACTS))
    batch = editor.tokenise(FACTS)
    batch.strengths = torch.tensor([1.0, 3.0, 1.0, 1.0])
    strong, _ = editor.capture(batch)
    rows = [editor.capture(editor.tokenise([f]))[0][editor.module_names[0]][0].shape[0] for f in FACTS]
    second = slice(rows[0], rows[0] + rows[1])
    for name in editor.module_names:
        torch.testing.assert_close(strong[name][0], plain[name][0])  # keys do not depend on the loss
        expected = plain[name][1].clone()
        expected[second] *= 3.0
        torch.testing.assert_close(strong[name][1], expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="strengths"):
        editor.propose(FACTS, strengths=[1.0])
    assert not torch.equal(
        editor.propose(FACTS, strengths=[1.0, 3.0, 1.0, 1.0]).deltas[editor.module_names[0]],
        editor.propose(FACTS).deltas[editor.module_names[0]],
    )


def test_applying_the_plan_lowers_the_edit_loss_and_step_two_sees_step_one(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, edit_lr=0.1)
    loss_before = _edit_loss(editor)
    plan = editor.propose(FACTS)
    first, second = plan.steps
    assert first.edit_loss == pytest.approx(loss_before, rel=1e-4)
    assert second.edit_loss < first.edit_loss, "step 2 must run on the weights after step 1"
    saved = apply(editor.model, plan)
    assert _edit_loss(editor) < second.edit_loss
    restore(editor.model, saved)
    assert _edit_loss(editor) == loss_before


def test_a_frozen_normaliser_returns_the_unchanged_state(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, freeze_normaliser=True)
    state = editor.edit_state()
    plan = editor.propose(FACTS)
    assert all(torch.equal(plan.editor_state[k], v) for k, v in state.items())


def test_adopting_a_plan_state_and_reverting_to_a_recorded_state_is_exact(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer)
    recorded = editor.edit_state()
    plan = editor.propose(FACTS)
    editor.adopt_state(plan)
    assert all(torch.equal(editor.edit_state()[k], v) for k, v in plan.editor_state.items())
    editor.load_edit_state(recorded)
    assert all(torch.equal(editor.edit_state()[k], v) for k, v in recorded.items())


def test_the_same_edit_is_proposed_twice_from_the_same_state(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer)
    first, second = editor.propose(FACTS), editor.propose(FACTS)
    assert all(torch.equal(first.deltas[n], second.deltas[n]) for n in editor.module_names)


def test_bf16_model_gets_fp32_deltas_and_masters_are_not_changed(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, dtype=torch.bfloat16, edit_lr=0.1)
    masters = master_copies(editor.model, editor.module_names)
    copy = {n: t.clone() for n, t in masters.items()}
    before = _params(editor.model)
    plan = editor.propose(FACTS, masters)
    assert all(torch.equal(masters[n], copy[n]) for n in masters)
    assert all(torch.equal(p, before[n]) for n, p in editor.model.named_parameters())
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in plan.deltas.values())
    apply(editor.model, plan, masters)
    assert _edit_loss(editor) < plan.steps[0].edit_loss


def test_batch_mode_shares_one_network_across_steps(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, mode="batch", steps=3)
    name = editor.module_names[0]
    assert editor.nets.net(1, name)[0] is editor.nets.net(3, name)[0]
    sequential = _editor(engine_tiny_lm, bpe_tokenizer, steps=3)
    assert sequential.nets.net(1, name)[0] is not sequential.nets.net(2, name)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cpu_hypernetwork_on_cuda(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, hypernet_device="cuda")
    plan = editor.propose(FACTS)
    assert all(d.device.type == "cpu" for d in plan.deltas.values())


# Unrelated to the edited fact. Neighbours such as "The capital of Japan is" do move with the plain ridge
# solve (measured: both "capital of Japan" and "Eiffel Tower is in the city of" then answered Rome).
UNRELATED = [
    "The chemical symbol for gold is",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
    "William Shakespeare was born in",
    "The author of the Harry Potter books is",
]


def _greedy_answer(model: torch.nn.Module, tokenizer: Any, prompt: str, tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


@pytest.mark.real_model
def test_a_trained_edit_changes_smollm2s_answer_and_keeps_unrelated_answers(default_model: Any) -> None:
    from editing.engine.synthetic import synthetic_examples
    from editing.engine.training import TrainingOptions, meta_train
    from editing.model.targets import default_edit_modules

    model, tokenizer = default_model.model, default_model.tokenizer
    names = default_edit_modules(default_model.model_type, default_model.num_layers)
    torch.manual_seed(0)
    editor = EMSEditor(model, tokenizer, names, EditorConfig(rank=32, n_blocks=2, edit_lr=1e-3))
    options = TrainingOptions(n_batches=3, batch_size=4, meta_lr=1e-4, single_adam_step=False, squared_l2_coef=False)
    meta_train(editor, synthetic_examples(12, seed=1), options)
    fact = EditExample("The capital of France is", "Rome")
    target = tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    assert _greedy_answer(model, tokenizer, fact.prompt, len(target)) != target
    unrelated_before = [_greedy_answer(model, tokenizer, p, 1) for p in UNRELATED]
    saved = apply(model, editor.propose([fact]))
    try:
        assert _greedy_answer(model, tokenizer, fact.prompt, len(target)) == target
        unrelated_after = [_greedy_answer(model, tokenizer, p, 1) for p in UNRELATED]
    finally:
        restore(model, saved)
    assert unrelated_after == unrelated_before
