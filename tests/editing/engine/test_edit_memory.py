"""The edit memory (`preserve_edits`): exact Grams, replay equal to the live state, earlier edits kept, exact reverts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from editing.config import EditorConfig
from editing.engine.deltas import apply, master_copies
from editing.engine.edit_memory import (
    exact_gram,
    is_memory_key,
    memory,
    memory_key,
    quantise_keys,
    remember,
    replayed_state,
    rows_key,
    stored_state,
)
from editing.engine.emsedit import EMSEditor
from editing.engine.synthetic import synthetic_examples
from editing.engine.training import TrainingOptions, meta_train
from editing.state.history import ModelHistory, prepare_commit
from editing.state.weights import WeightState
from store.artefacts import ArtefactKind, ArtefactStore
from tests.editing.state.test_history import Ledger

CONFIG = EditorConfig(rank=8, n_blocks=1, edit_lr=1e-2, lm_batch_size=8)


def _keys(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed))


def test_quantised_keys_are_within_half_a_step_and_their_gram_is_exact_in_any_order() -> None:
    keys = _keys(40, 0)
    quantised, exponent = quantise_keys(keys)
    assert quantised.dtype == torch.int16 and int(quantised.abs().max()) > 16383  # the range is used
    step = 2.0 ** int(exponent)
    assert float((quantised.double() * step - keys.double()).abs().max()) <= step / 2
    gram = exact_gram(quantised, exponent)
    assert gram.dtype == torch.float64
    # integer arithmetic: permuting the rows (another summation order) or summing row by row gives the same bits
    permuted = exact_gram(quantised[torch.randperm(40, generator=torch.Generator().manual_seed(1))], exponent)
    assert torch.equal(gram, permuted)
    one_by_one = sum((exact_gram(quantised[i : i + 1], exponent) for i in range(40)), torch.zeros(16, 16, dtype=torch.float64))
    assert torch.equal(gram, one_by_one)
    reference = keys.double().T @ keys.double()
    assert float((gram - reference).norm() / reference.norm()) < 1e-4


def test_zero_keys_quantise_to_zero_and_non_finite_keys_are_refused() -> None:
    quantised, exponent = quantise_keys(torch.zeros(3, 4))
    assert not quantised.any() and int(exponent) == 0
    with pytest.raises(ValueError, match="not finite"):
        quantise_keys(torch.tensor([[1.0, float("nan")]]))


def test_replaying_the_stored_states_rebuilds_the_live_memory_bit_for_bit() -> None:
    stats = {"nets.0.normaliser.count": torch.tensor(0.0, dtype=torch.float64)}
    live: dict[str, torch.Tensor] = dict(stats)
    stored = []
    for version in range(1, 6):
        # edits of different sizes and key scales, one module only in some of them
        keys = {"a": _keys(3 * version, version, scale=10.0**-version)}
        if version % 2:
            keys["b"] = _keys(5, 100 + version)
        live = {"nets.0.normaliser.count": torch.tensor(float(version), dtype=torch.float64)} | remember(live, keys)
        stored.append(stored_state(live))
        assert not any(k.startswith("edit_memory/") for k in stored[-1]), "commits store keys, not Grams"
    replayed: dict[str, torch.Tensor] = dict(stats)
    for state in stored:
        replayed = replayed_state(replayed, state)
    assert replayed.keys() == live.keys()
    assert all(torch.equal(replayed[k], live[k]) for k in live)
    assert set(memory(replayed)) == {"a", "b"}
    # a commit that stored nothing keeps the state it followed
    assert replayed_state(replayed, {}) == replayed


def _editor(engine_tiny_lm: Any, tokenizer: Any, **changes: Any) -> EMSEditor:
    model, names = engine_tiny_lm("llama")
    return EMSEditor(model, tokenizer, names, CONFIG.model_copy(update=changes))


def _first_edit_keys(editor: EMSEditor, facts: Any) -> dict[str, torch.Tensor]:
    captures, _ = editor.capture(editor.tokenise(facts))
    return {name: keys for name, (keys, _) in captures.items()}


def test_a_second_edit_leaves_the_outputs_at_the_first_edits_keys_far_more_still(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    facts = synthetic_examples(16, seed=5)
    moved: dict[float, float] = {}
    for beta in (0.0, 1.0, 100.0):
        editor = _editor(engine_tiny_lm, bpe_tokenizer, preserve_edits=beta)
        masters = master_copies(editor.model, editor.module_names)
        first = editor.propose(facts[:8], masters)
        apply(editor.model, first, masters)
        editor.adopt_state(first)
        if beta > 0:
            assert set(memory(first.editor_state)) == set(editor.module_names)
        else:
            assert not any(is_memory_key(k) for k in first.editor_state), "no memory without the option"
        keys = _first_edit_keys(editor, facts[:8])  # the first edit's keys on the edited model
        second = editor.propose(facts[8:], masters)
        # Σ ‖k ΔW₂‖² over the first edit's keys, relative to ‖ΔW₂‖ so that a merely smaller edit does not pass
        moved[beta] = sum(
            float((keys[n] @ second.deltas[n]).square().sum()) / float(second.deltas[n].square().sum())
            for n in editor.module_names
        )
    assert moved[100.0] < 0.2 * moved[0.0] and moved[1.0] < moved[0.0], moved


def test_propose_leaves_the_memory_alone_and_a_recorded_state_comes_back_exactly(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, preserve_edits=1.0)
    facts = synthetic_examples(8, seed=2)
    masters = master_copies(editor.model, editor.module_names)
    first = editor.propose(facts[:4], masters)
    apply(editor.model, first, masters)
    editor.adopt_state(first)
    recorded = editor.edit_state()
    second = editor.propose(facts[4:], masters)
    assert all(torch.equal(editor.edit_state()[k], v) for k, v in recorded.items()), "propose changes no state"
    name = editor.module_names[0]
    quantised = second.editor_state[rows_key(name)]
    grown = recorded[memory_key(name)] + exact_gram(quantised, second.editor_state["edit_memory_exponent/" + name])
    assert torch.equal(second.editor_state[memory_key(name)], grown)
    editor.adopt_state(second)
    editor.load_edit_state(recorded)
    assert editor.edit_state().keys() == recorded.keys()
    assert all(torch.equal(editor.edit_state()[k], v) for k, v in recorded.items())


def test_commits_store_the_keys_and_reverts_and_restarts_rebuild_the_memory_exactly(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None, tmp_path: Path
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, preserve_edits=1.0)
    state = WeightState(editor.model, editor.module_names)
    store = ArtefactStore(tmp_path / "artefacts")
    history = ModelHistory(state, store, editor=editor, snapshot_every=2)
    ledger = Ledger()
    history.open(ledger.refs)
    facts = synthetic_examples(12, seed=4)
    states = {0: editor.edit_state()}
    for version in (1, 2, 3):
        plan = editor.propose(facts[4 * (version - 1) : 4 * version], masters=state.masters())
        history.commit(prepare_commit(plan.deltas, plan.editor_state), version=version, record=ledger.record)
        history.consolidate(ledger.refs)
        states[version] = editor.edit_state()
    commit = store.read(ArtefactKind.COMMIT, 3)
    assert not any(k.startswith("editor/edit_memory/") for k in commit.tensors), "no Gram in a commit artefact"
    assert any(k.startswith("editor/edit_memory_rows/") for k in commit.tensors)

    def same(version: int) -> bool:
        now = editor.edit_state()
        return now.keys() == states[version].keys() and all(torch.equal(now[k], states[version][k]) for k in now)

    for version in (1, 0, 3):  # replayed from the genesis, a snapshot (version 2) and its following commit
        history.revert_to(version, ledger.refs, record=lambda: None)
        assert same(version), version
    # a restart: a fresh editor and history recover the live version from the artefacts
    fresh = _editor(engine_tiny_lm, bpe_tokenizer, preserve_edits=1.0)
    editor = fresh
    again = ModelHistory(WeightState(fresh.model, fresh.module_names), store, editor=fresh, snapshot_every=2)
    again.open(ledger.refs)
    again.recover(ledger.refs, 3)
    assert same(3)


def test_training_solves_against_its_own_stream_and_leaves_no_memory_behind(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor = _editor(engine_tiny_lm, bpe_tokenizer, preserve_edits=1.0)
    sizes: list[int] = []
    original = editor.module_delta

    def spy(step: int, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        sizes.append(len(editor._memory_priors))
        return original(step, name, keys, grads)

    editor.module_delta = spy  # type: ignore[method-assign]
    meta_train(editor, synthetic_examples(24, seed=1), TrainingOptions(n_batches=3, batch_size=8))
    assert sizes[0] == 0 and max(sizes) == len(editor.module_names), "later training batches see the memory"
    assert not any(is_memory_key(k) for k in editor.edit_state()), "training leaves the memory empty"
