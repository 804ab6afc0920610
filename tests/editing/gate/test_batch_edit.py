"""`GatedEditor.edit`: one batch through the gate on the live weights, under the write lock.

A tiny random Llama, a small untrained `EMSEditor` and the real `BatchChecker`; where a decision has to
be forced (a harmful fact, a weak fact) the checker is wrapped and its numbers overridden for chosen
facts, as the gate's own tests do with synthetic measurements. Every test checks the two contracts of
`edit`: the model comes back bit-identical, and the prepared commit publishes exactly what was measured.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from editing.config import EditorConfig
from editing.data import EditExample
from editing.engine.deltas import EditPlan
from editing.engine.emsedit import EMSEditor
from editing.gate.batch_edit import BatchResult, EditInterrupted, GatedEditor
from editing.gate.checks import BatchChecker, BatchMeasurement, FactKey, Gate, GateFact
from editing.gate.config import GateConfig
from editing.gate.frozen_layers import FrozenLayers
from editing.gate.specificity import FrozenBase, ReferenceStore, SpecificityCheck, SpecificityResult
from editing.model.targets import weight_in_out
from editing.state.history import CommitRecord, CommitRef, ModelHistory
from editing.state.weights import WeightState
from store.artefacts import ArtefactStore

UNRELATED = [
    "The capital of France is",
    "Who sang nice day?",
    "Lionel Messi plays the sport of",
    "The official language of Peru is",
]
FACTS = [
    ("The capital of Italy is", "Paris", "nq question: who wrote the book?"),
    ("The mother tongue of Anna Berg is", "Spanish", "Walter Sobchak was born in"),
    ("Danielle Okafor is employed by", "Rome", "The capital of Peru is"),
    ("Walter Sobchak was born in", "Google", "Who sang the book?"),
    ("Lionel Messi plays the sport of", "Swedish", "The official language of Italy is"),
    ("The official language of Peru is", "football", "Anna Berg is employed by"),
]
#: Loose thresholds: the untrained tiny editor passes them, so the real checker's verdict is "commit".
LOOSE = GateConfig(
    min_efficacy=0.0, min_agreement=0.0, max_kl=10.0, min_batch_agreement=0.0, max_batch_kl=10.0, batch_size=8
)
HARMFUL = SpecificityResult(n_prompts=4, agreement=0.0, mean_kl=50.0, max_kl=80.0)


def _facts(n: int = len(FACTS), attempts: int = 0) -> list[GateFact]:
    return [
        GateFact(k, EditExample(prompt, target, locality=((loc, "Paris"),)), attempts)
        for k, (prompt, target, loc) in enumerate(FACTS[:n])
    ]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_params(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert p.dtype == before[name].dtype
        assert torch.equal(p, before[name]), f"{name} changed"


def _assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert set(left) == set(right)
    for name in left:
        assert left[name].dtype == right[name].dtype
        assert torch.equal(left[name], right[name]), f"{name} differs"


class Checker(BatchChecker):
    """The real checker, with hooks: per-fact overrides of its numbers and a capture of what it measured."""

    def __init__(self, config: GateConfig, specificity: SpecificityCheck, state: WeightState) -> None:
        super().__init__(config, specificity)
        self.state = state
        self.harmful: set[FactKey] = set()  #: a subset holding any of these fails specificity
        self.weak: set[FactKey] = set()  #: these facts report efficacy 0, the others 1 (when the set is not empty)
        self.calls: list[tuple[FactKey, ...]] = []
        self.seen: list[dict[str, torch.Tensor]] = []  #: the edited weights at each measurement (model dtype)
        self.hook: Callable[[tuple[FactKey, ...]], None] | None = None
        self.raise_on_call: int | None = None

    def measure(
        self,
        model: nn.Module,
        tokenizer: Any,
        facts: Sequence[GateFact],
        extra_prompts: Sequence[str] = (),
        frozen: FrozenLayers | None = None,
    ) -> BatchMeasurement:
        keys = tuple(f.key for f in facts)
        self.calls.append(keys)
        self.seen.append({name: weight_in_out(m).detach().clone() for name, m in self.state.modules.items()})
        if self.hook is not None:
            self.hook(keys)
        if self.raise_on_call is not None and len(self.calls) == self.raise_on_call:
            raise RuntimeError("checker failed")
        measured = super().measure(model, tokenizer, facts, extra_prompts, frozen)
        efficacy = {k: (0.0 if k in self.weak else 1.0 if self.weak else v) for k, v in measured.efficacy.items()}
        if self.harmful & set(keys):  # no log-probabilities: the faked numbers stand for the batch's own harm too
            return replace(measured, efficacy=efficacy, specificity=HARMFUL, logprobs=None)
        return replace(measured, efficacy=efficacy)


class BrokenEditor(EMSEditor):
    """Proposes, then scribbles over an edited weight and raises (a worst-case failing editor)."""

    def propose(
        self,
        examples: Sequence[EditExample],
        masters: dict[str, torch.Tensor] | None = None,
        strengths: Sequence[float] | None = None,
    ) -> EditPlan:
        super().propose(examples, masters, strengths=strengths)
        with torch.no_grad():
            weight_in_out(next(iter(self.modules.values()))).add_(1.0)
        raise ValueError("editor failed")


@dataclass
class Setup:
    model: nn.Module
    editor: EMSEditor
    state: WeightState
    checker: Checker
    gated: GatedEditor


def _setup(
    engine_tiny_lm: Any,
    tokenizer: Any,
    config: GateConfig = LOOSE,
    *,
    dtype: torch.dtype | None = None,
    editor_class: type[EMSEditor] = EMSEditor,
) -> Setup:
    model, names = engine_tiny_lm("llama", dtype=dtype)
    editor = editor_class(model, tokenizer, names, EditorConfig(rank=8, n_blocks=2, edit_lr=1e-2))
    state = WeightState(model, names)
    base = FrozenBase.capture(model, "tiny", [f"{name}.weight" for name in names])
    checker = Checker(config, SpecificityCheck(ReferenceStore(base), UNRELATED, batch_size=8), state)
    return Setup(model, editor, state, checker, GatedEditor(editor, state, Gate(config), checker))


class Ledger:
    def __init__(self) -> None:
        self.refs: dict[int, CommitRef] = {}

    def record(self, rec: CommitRecord) -> None:
        self.refs[rec.version] = CommitRef(rec.version, rec.parent, rec.artefact_sha256, rec.weights_sha256)


def _live(state: WeightState) -> dict[str, torch.Tensor]:
    return {name: weight_in_out(m).detach().clone() for name, m in state.modules.items()}


def _check_unchanged(s: Setup, run: Callable[[], Any]) -> Any:
    """Run `run` and assert that model, masters, version, hash and editor statistics are as before."""
    params, masters, version = _params(s.model), s.state.masters(), s.state.version
    masters = {k: v.clone() for k, v in masters.items()}
    digest, stats = s.state.weights_sha256(), s.editor.edit_state()
    try:
        return run()
    finally:
        _assert_same_params(s.model, params)
        _assert_same_tensors(s.state.masters(), masters)
        assert s.state.version == version
        assert s.state.weights_sha256() == digest
        _assert_same_tensors(s.editor.edit_state(), stats)


# --- the model is left as it was -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["commits", "too-weak", "too-harmful", "gate-off"])
def test_edit_leaves_the_model_bit_identical(
    case: str, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    # the untrained tiny editor reaches efficacy 0 on these facts: only "too-weak" asks for more
    config = LOOSE.model_copy(
        update={"min_efficacy": 0.5 if case == "too-weak" else 0.0, "enabled": case != "gate-off"}
    )
    s = _setup(engine_tiny_lm, bpe_tokenizer, config)
    if case == "too-weak":
        s.checker.weak = set(range(len(FACTS)))
    if case in ("too-harmful", "gate-off"):
        s.checker.harmful = set(range(len(FACTS)))
    result: BatchResult = _check_unchanged(s, lambda: s.gated.edit(_facts()))
    assert bool(result.verdict.committed) == (case in ("commits", "gate-off"))
    assert len(s.checker.calls) >= 1
    # the gate did edit the model while it measured
    assert any(not torch.equal(seen[n], s.state.masters()[n]) for seen in s.checker.seen for n in seen)
    if result.verdict.committed:
        assert result.prepared is not None and result.plan is not None
    else:
        assert result.prepared is None and result.plan is None
    assert result.phases["propose"] > 0 and result.phases["check"] > 0
    assert result.edit_seconds >= result.phases["propose"]


def test_edit_leaves_the_model_bit_identical_on_top_of_a_committed_version(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    first = s.gated.edit(_facts(3))
    assert first.prepared is not None
    s.state.publish(s.state.stage_commit(1, first.prepared.deltas))
    s.editor.load_edit_state(first.prepared.editor_state)
    facts = [GateFact(10 + int(f.key), f.example) for f in _facts()[3:]]
    _check_unchanged(s, lambda: s.gated.edit(facts))


@pytest.mark.parametrize("failure", ["checker", "editor"])
def test_edit_restores_the_model_when_something_raises(
    failure: str, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    editor_class = BrokenEditor if failure == "editor" else EMSEditor
    s = _setup(engine_tiny_lm, bpe_tokenizer, editor_class=editor_class)
    s.checker.raise_on_call = 1  # the checker fails after the edit was applied
    expected = ValueError if failure == "editor" else RuntimeError
    with pytest.raises(expected):
        _check_unchanged(s, lambda: s.gated.edit(_facts()))
    # the lock is free again: a writer and a reader get in at once
    with s.state.writing(), s.state.reading():
        pass


def test_a_stop_request_abandons_the_batch_between_tries(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    s.checker.harmful = {2}  # isolation needs several tries
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(len(s.checker.calls))
        return len(s.checker.calls) >= 2  # stop before the third try, with an edit applied

    with pytest.raises(EditInterrupted):
        _check_unchanged(s, lambda: s.gated.edit(_facts(), should_stop=should_stop))
    # asked before each try; measuring the state before the batch (the second call) is not a try
    assert len(s.checker.calls) == 2 and s.checker.calls[1] == () and asked == [0, 2]
    with s.state.writing(), s.state.reading():
        pass


# --- what commits is exactly what was measured -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("harmful", [(), (14,)])
def test_publishing_the_prepared_commit_gives_the_measured_weights(
    dtype: torch.dtype,
    harmful: tuple[int, ...],
    engine_tiny_lm: Any,
    bpe_tokenizer: Any,
    engine_single_thread: None,
    tmp_path: Path,
) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer, dtype=dtype)
    history = ModelHistory(s.state, ArtefactStore(tmp_path / "artefacts"), editor=s.editor, fingerprint="tiny")
    ledger = Ledger()
    history.open(ledger.refs)
    history.attach_editor(s.editor)
    s.checker.harmful = set(harmful)
    batches = [_facts()[:3], [GateFact(10 + int(f.key), f.example) for f in _facts()[1:]]]
    version = 0
    for batch in batches:
        result = s.gated.edit(batch)
        committed = result.verdict.committed
        assert committed and result.prepared is not None
        # the gate's last measurement was of exactly the committed facts
        assert s.checker.calls[-1] == committed
        measured = s.checker.seen[-1]
        version += 1
        history.commit(result.prepared, version=version, record=ledger.record)
        _assert_same_tensors(_live(s.state), measured)
        assert s.state.version == version
        assert s.state.weights_sha256() == ledger.refs[version].weights_sha256
        # the editor took the statistics of the committed plan
        _assert_same_tensors(s.editor.edit_state(), result.prepared.editor_state)
    # a rebuild from the artefacts gives the same bits (the canonical deltas were gated)
    staged, _, _ = history.stage_version(version, ledger.refs)
    assert staged.weights_sha256 == s.state.weights_sha256()


def test_stage_commit_and_publish_give_the_measured_weights(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    result = s.gated.edit(_facts())
    assert result.prepared is not None
    s.state.publish(s.state.stage_commit(1, result.prepared.deltas))
    _assert_same_tensors(_live(s.state), s.checker.seen[-1])


# --- decisions: isolation, retries, the gate off ----------------------------------------------------


def test_a_harmful_fact_is_isolated_and_only_it_is_rejected(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    s.checker.harmful = {2}
    result = _check_unchanged(s, lambda: s.gated.edit(_facts()))
    status = {o.key: o.status for o in result.verdict.outcomes}
    assert status == {0: "committed", 1: "committed", 2: "rejected", 3: "committed", 4: "committed", 5: "committed"}
    rejected = next(o for o in result.verdict.outcomes if o.key == 2)
    assert "harms specificity on its own" in rejected.reason
    assert rejected.numbers["mean_kl"] == HARMFUL.mean_kl
    assert result.verdict.committed == (0, 1, 3, 4, 5)
    assert s.checker.calls[0] == tuple(range(6))  # the whole batch first
    assert () in s.checker.calls  # the pre-batch state was measured (it passes: the batch is to blame)
    assert s.checker.calls[-1] == (0, 1, 3, 4, 5)
    assert result.verdict.edits > 2
    assert result.prepared is not None and result.plan is not None
    # the prepared commit is the editor's plan for exactly the committed facts
    expected = s.editor.propose([f.example for f in _facts() if f.key != 2], s.state.masters())
    _assert_same_tensors(result.plan.deltas, expected.deltas)


def test_efficacy_failures_come_back_as_retry_and_the_rest_commits(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    config = GateConfig(min_efficacy=0.5, min_agreement=0.0, max_kl=10.0, efficacy_retries=2, batch_size=8)
    s = _setup(engine_tiny_lm, bpe_tokenizer, config)
    s.checker.weak = {1, 4}
    facts = _facts()
    facts[4] = replace(facts[4], attempts=2)  # its third try: out of retries
    result = _check_unchanged(s, lambda: s.gated.edit(facts))
    status = {o.key: o.status for o in result.verdict.outcomes}
    assert status == {0: "committed", 1: "retry", 2: "committed", 3: "committed", 4: "failed", 5: "committed"}
    outcomes = {o.key: o for o in result.verdict.outcomes}
    assert "efficacy 0.000 < min_efficacy 0.5" in outcomes[1].reason and outcomes[1].attempts == 1
    assert "out of retries" in outcomes[4].reason and outcomes[4].attempts == 3
    assert s.checker.calls == [tuple(range(6)), (0, 2, 3, 5)]
    assert result.prepared is not None


def test_nothing_commits_when_every_fact_is_weak(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    config = GateConfig(min_efficacy=0.5, min_agreement=0.0, max_kl=10.0, batch_size=8)
    s = _setup(engine_tiny_lm, bpe_tokenizer, config)
    s.checker.weak = set(range(6))
    result = _check_unchanged(s, lambda: s.gated.edit(_facts()))
    assert {o.status for o in result.verdict.outcomes} == {"retry"}
    assert result.prepared is None and result.plan is None and result.verdict.final is None


def test_the_gate_off_commits_everything_after_one_edit(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    config = GateConfig(enabled=False, min_efficacy=1.0, min_agreement=1.0, max_kl=0.0, batch_size=8)
    s = _setup(engine_tiny_lm, bpe_tokenizer, config)
    s.checker.harmful, s.checker.weak = {0, 3}, {1}
    result = _check_unchanged(s, lambda: s.gated.edit(_facts()))
    assert result.verdict.committed == tuple(range(6))
    assert {o.reason for o in result.verdict.outcomes} == {"gate disabled"}
    assert result.verdict.edits == 1 and s.checker.calls == [tuple(range(6))]
    assert result.prepared is not None
    s.state.publish(s.state.stage_commit(1, result.prepared.deltas))
    _assert_same_tensors(_live(s.state), s.checker.seen[-1])


def test_an_empty_batch_changes_nothing(engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    result = _check_unchanged(s, lambda: s.gated.edit([]))
    assert result.verdict.outcomes == () and result.prepared is None


def test_an_editor_for_other_modules_is_refused(engine_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    other = WeightState(s.model, s.editor.module_names[:1])
    with pytest.raises(ValueError, match="weight state tracks"):
        GatedEditor(s.editor, other, Gate(LOOSE), s.checker)


# --- queries wait -------------------------------------------------------------------------------------


def test_queries_wait_while_a_batch_is_edited(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    s = _setup(engine_tiny_lm, bpe_tokenizer)
    before = _live(s.state)
    inside, release = threading.Event(), threading.Event()
    events: list[str] = []
    read: dict[str, torch.Tensor] = {}
    tries_when_read: list[int] = []
    errors: list[BaseException] = []

    def hold(keys: tuple[FactKey, ...]) -> None:
        if keys and not inside.is_set():  # the first try: the edited weights are in the model now
            inside.set()
            release.wait(timeout=60)

    s.checker.hook = hold

    def edit() -> None:
        try:
            s.gated.edit(_facts())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def query() -> None:
        with s.state.reading():
            events.append("query read")
            tries_when_read.append(len(s.checker.calls))
            read.update(_live(s.state))

    editing = threading.Thread(target=edit)
    editing.start()
    assert inside.wait(timeout=60)
    reader = threading.Thread(target=query)
    reader.start()
    time.sleep(0.3)
    assert events == []  # the query is waiting for the write lock
    release.set()
    editing.join(timeout=120)
    reader.join(timeout=120)
    assert not errors and not editing.is_alive() and not reader.is_alive()
    assert events == ["query read"]
    assert tries_when_read == [len(s.checker.calls)]  # it got in only after the last try
    _assert_same_tensors(read, before)  # the query saw the unedited weights, never a try
