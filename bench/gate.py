"""Gated against ungated lifelong editing of SmolLM2-135M-Instruct over the ZsRE dev stream.

Two runs from the same base model with the same trained EMSEdit editor, editing the first `--facts`
ZsRE dev facts in batches of `--batch-size`. Each run is the daemon's own edit loop
(`daemon.edit_loop.EditLoop.run_batch`) on a temporary state directory and SQLite ledger: the facts are
added to the ledger as pending facts (`store.intake.add_facts`), and the bench calls `run_batch` until no
fact is pending, the loop pauses (a blocked batch: the live model already fails the gate), or
`--max-batches` (default: four passes over the facts) is reached. Claim order and batch sizes, retries
(with the daemon's stronger retry signal), the commit protocol and the settling of every fact are the
daemon's; the bench reads what happened from the ledger (fact states and attempts, the gate's record of every
batch) and from each `BatchReport`.

- `gated`: the default `GateConfig`. Facts the gate rejects or that run out of retries stay out; facts
  sent back (`retry`, `deferred`) are pending again and claimed again oldest first (those that missed
  efficacy in batches of their own, of at most `retry_batch_size`).
- `ungated`: the same loop with `enabled = False`: every batch commits unchecked. The checker still
  measures each batch once (that is how `Gate.decide` works with the gate off), which gives the drift curve.

The loop's periodic probes and drift policy are not run (they would pause or revert the ungated run):
the bench runs the probe suite on its own schedule and reports what the drift policy would do.

Reported per run: on the final model, efficacy (teacher-forced token accuracy of every fact's target on
its prompt, all facts and only the committed ones), generalisation (paraphrases), retention (top-1
agreement with the unedited model on the facts' locality prompts, `editing.model.edit_metrics.evaluate_examples`),
the locality prompts' gold-answer accuracy, the periodic GLUE-style probes (pooled accuracy, the base
model's, flip rate and what the drift policy would do; also every `--probe-every` batches), fact
counts by outcome and each fact's attempts (the ledger's state and claim count; a fact still pending
counts as `not_applied_<its last gate outcome>`), and per batch the edit and check seconds (wall and
CPU) and their ratio, timed by wrapping the editor's `propose`, the loop's checker and the history's
commit (the ledger keeps no per-phase times).

`--calibrate-batches` commits held-out zsre_train batches with the same loop, gate off.

    .venv/bin/python -m bench.gate                        # both runs, 512 facts, batches of 16
    .venv/bin/python -m bench.gate --facts 64 --probe-every 0 --out /tmp/gate-quick.json
    .venv/bin/python -m bench.gate --runs ungated         # one run; gate.json collects all finished runs

Run it with -m from the repository root: as `python bench/gate.py` this file's folder would come first
on sys.path, and bench/ingest.py would shadow the `ingest` package the daemon imports.

Every batch is saved to `bench/results/tmp/gate-<run>.json` (git-ignored) as it finishes; `gate.json`
and `gate.md` are assembled from the finished runs made with the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.bootstrap import open_ledger, open_model_state
from daemon.config import Settings
from daemon.edit_loop import BatchReport, EditLoop
from daemon.metrics import Metrics
from daemon.service_state import ServiceState
from editing.config import EditorConfig, ModelConfig
from editing.data import EditExample, examples_hash, load_examples, load_zsre
from editing.engine.checkpoint import CONFIG_FILE, WEIGHTS_FILE, build_editor, load_checkpoint
from editing.engine.emsedit import EMSEditor
from editing.gate.batch_edit import BatchResult, GatedEditor
from editing.gate.checks import BatchChecker, BatchMeasurement, Gate, GateFact, locality_prompts
from editing.gate.config import GateConfig
from editing.gate.frozen_layers import FrozenLayers
from editing.gate.probes import DriftPolicy, ProbeSuite
from editing.gate.specificity import FrozenBase, ReferenceStore
from editing.model.edit_metrics import EvaluationResult, evaluate_examples
from editing.model.loading import LoadedModel, file_sha256, load_model
from editing.state.weights import WeightState
from store import intake
from store.config import StoreConfig
from store.db import make_session_factory
from store.models import Fact, FactStatus, ProbeKind, ProbeRun
from store.records import FactIn, Locality, Origin
from store.work import pending_backlog

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PARTIAL = RESULTS / "tmp"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_EDITOR = ROOT / ".cache" / "editors" / "emsedit-zsre"
CACHE = ROOT / ".cache"
RUNS = ("gated", "ungated", "tuned")
#: what a batch record keeps of each fact's gate numbers
OUTCOME_NUMBERS = ("efficacy", "agreement", "mean_kl", "batch_agreement", "batch_mean_kl")
#: the loop's summary of a batch's gate verdict (a gate run's scores in the ledger) -> batch record key, digits
GATE_SCORES = {
    "efficacy": ("gate_efficacy", 4),
    "agreement": ("agreement", 4),
    "mean_kl": ("mean_kl", 5),
    "batch_agreement": ("batch_agreement", 4),
    "batch_mean_kl": ("batch_mean_kl", 5),
}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


class Clock:
    """Wall and process-CPU seconds since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.wall, 3), "cpu_s": round(time.process_time() - self.cpu, 3)}


@dataclass
class Calls:
    """Wall and CPU seconds of every call of a wrapped method, and its last return value (reset per batch)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    last: Any = None

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock = Clock()
            try:
                self.last = fn(*args, **kwargs)
                return self.last
            finally:
                spent = clock.read()
                self.wall.append(spent["wall_s"])
                self.cpu.append(spent["cpu_s"])

        return timed

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.last = None


@dataclass
class Env:
    """What all runs share: the model, its base weight state, the editor, references, data and base scores."""

    args: argparse.Namespace
    loaded: LoadedModel
    model_config: ModelConfig
    editor_config: EditorConfig
    editor: EMSEditor
    state: WeightState  #: over the base weights; resets the model between runs, measures the calibration
    references: ReferenceStore
    examples: list[EditExample]
    base_eval: EvaluationResult
    base_stats: dict[str, torch.Tensor]
    proposes: Calls
    info: dict[str, Any]


def base_evaluation(loaded: LoadedModel, examples: list[EditExample]) -> tuple[EvaluationResult, dict[str, float]]:
    """The unedited model's scores and reference predictions, cached on disk per model and fact set."""
    key = f"{loaded.fingerprint[:16]}-{examples_hash(examples)[:16]}"
    path = CACHE / "gate-bench" / f"base-eval-{key}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=False)
        if isinstance(stored, EvaluationResult):
            return stored, {"wall_s": 0.0, "cpu_s": 0.0}
    clock = Clock()
    result = evaluate_examples(loaded.model, loaded.tokenizer, examples, batch_size=16)
    spent = clock.read()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result, spent


def _option(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` of an EditorConfig field, the value parsed as JSON where it parses (true, 100, 1e-3)."""
    key, sep, value = item.partition("=")
    if not sep or key not in EditorConfig.model_fields:
        raise SystemExit(f"--editor-option {item!r}: expected FIELD=VALUE with an [editor] field")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def setup(args: argparse.Namespace) -> Env:
    torch.manual_seed(0)
    clock = Clock()
    model_config = ModelConfig(device="cpu", cache_dir=CACHE / "models")
    loaded = load_model(model_config, cache_dir=CACHE / "models")
    checkpoint = load_checkpoint(args.editor)
    options = dict(_option(item) for item in args.editor_option)
    editor_config = EditorConfig(**options)
    editor = build_editor(
        loaded.model, loaded.tokenizer, loaded.fingerprint, checkpoint, editor_config,
        earlier_fingerprints=loaded.earlier_fingerprints,
    )
    names = editor.module_names
    state = WeightState(loaded.model, names)
    base = FrozenBase.capture(loaded.model, loaded.fingerprint, [f"{name}.weight" for name in names])
    references = ReferenceStore(base, directory=CACHE / "gate-bench" / "references")
    examples = load_zsre(args.data / "zsre" / "zsre_dev.json", limit=args.facts)
    load_seconds = clock.read()
    base_eval, base_eval_seconds = base_evaluation(loaded, examples)
    proposes = Calls()
    # Time every propose (the gate calls it through this attribute, in every run).
    setattr(editor, "propose", proposes.wrap(editor.propose))  # noqa: B010
    training = checkpoint.info.training
    info = {
        "model_fingerprint": loaded.fingerprint,
        "model_type": loaded.model_type,
        "edited_modules": names,
        "editor": {
            "path": str(args.editor),
            "editor_safetensors_sha256": file_sha256(args.editor / WEIGHTS_FILE),
            "editor_config_sha256": file_sha256(args.editor / CONFIG_FILE),
            "mode": checkpoint.info.mode,
            "steps": checkpoint.info.steps,
            "rank": checkpoint.info.rank,
            "n_blocks": checkpoint.info.n_blocks,
            "training_data": training.get("data"),
            "training_data_hash": training.get("data_hash"),
            "training_examples": training.get("n_examples"),
            "optimiser_steps": training.get("optimiser_steps"),
            "training_options": training.get("options"),
            "edit_time_options": options,
        },
        "facts": len(examples),
        "facts_hash": examples_hash(examples),
        "batch_size": args.batch_size,
        "probe_every": args.probe_every,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_seconds": load_seconds,
        "base_eval_seconds": base_eval_seconds,
        "base": {k: round(v, 4) for k, v in base_eval.summary().items()},
    }
    return Env(
        args=args,
        loaded=loaded,
        model_config=model_config,
        editor_config=editor_config,
        editor=editor,
        state=state,
        references=references,
        examples=examples,
        base_eval=base_eval,
        base_stats=editor.edit_state(),
        proposes=proposes,
        info=info,
    )


def reset_to_base(env: Env) -> None:
    """Put the base weights back into the model and the editor's initial statistics into the editor."""
    env.state.publish(env.state.stage(0, []))
    env.editor.load_edit_state({k: v.clone() for k, v in env.base_stats.items()})


def fact_in(example: EditExample) -> FactIn:
    """A ZsRE example as the ledger stores a fact (`daemon.edit_loop.fact_example` is the way back)."""
    return FactIn(
        prompt=example.prompt,
        target_new=example.target_new,
        subject=example.subject,
        ground_truth=example.target_true,
        rephrase_prompts=tuple(example.rephrase_prompts),
        locality=tuple(Locality(prompt, answer) for prompt, answer in example.locality),
    )


@dataclass
class LoopRun:
    """The daemon's edit loop on a temporary state directory, with timers on its editor, checker and commits."""

    loop: EditLoop
    service: ServiceState  #: the loop's pauses
    sessions: sessionmaker[Session]
    state: WeightState  #: the loop's live weights
    fact_ids: list[int]  #: the ledger id of each example, in example order
    gated: GatedEditor
    edits: Calls = field(default_factory=Calls)  #: `GatedEditor.edit`; `last` is the batch's BatchResult
    measures: Calls = field(default_factory=Calls)
    commits: Calls = field(default_factory=Calls)
    _seen_gate_run: int = 0

    def example(self, fact_id: int) -> int:
        """The (first) example a ledger fact was added for."""
        return self.fact_ids.index(int(fact_id))

    def reset(self) -> None:
        for calls in (self.edits, self.measures, self.commits):
            calls.reset()

    def pending(self) -> int:
        with self.sessions() as session:
            count, _ = pending_backlog(session)
        return count

    def facts(self) -> dict[int, tuple[FactStatus, int]]:
        """Every fact of the ledger: id -> (status, attempts)."""
        with self.sessions() as session:
            rows = session.execute(select(Fact.id, Fact.status, Fact.attempts)).all()
        return {fid: (status, attempts) for fid, status, attempts in rows}

    def new_gate_run(self) -> tuple[dict[str, float], dict[str, Any]]:
        """The loop's record of the batch just run: the scores and details (`GateVerdict.to_dict`) of the
        newest gate run not read yet; empty when the batch left none (its edit raised)."""
        with self.sessions() as session:
            runs = list(
                session.scalars(
                    select(ProbeRun)
                    .where(ProbeRun.kind == ProbeKind.GATE, ProbeRun.id > self._seen_gate_run)
                    .order_by(ProbeRun.id)
                )
            )
        if not runs:
            return {}, {}
        self._seen_gate_run = runs[-1].id
        return dict(runs[-1].scores), dict(runs[-1].details)


def loop_settings(env: Env, gate: GateConfig, batch_size: int, state_dir: Path) -> Settings:
    """The daemon's settings for a bench run: the loaded model and editor, `gate`, a ledger in `state_dir`."""
    return Settings(
        state_dir=state_dir,
        model=env.model_config.model_copy(update={"edit_modules": list(env.editor.module_names)}),
        editor=env.editor_config.model_copy(update={"batch_size": batch_size}),
        gate=gate,
        store=StoreConfig(),  # explicit, so that no KED_STORE__URL in the environment names a real ledger
    )


@contextmanager
def temporary_loop(env: Env, gate: GateConfig, examples: Sequence[EditExample], batch_size: int) -> Iterator[LoopRun]:
    """An `EditLoop` on the base model in a fresh temporary state directory, `examples` pending in its ledger."""
    reset_to_base(env)
    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
        settings = loop_settings(env, gate, batch_size, Path(tmp))
        engine = open_ledger(settings)
        try:
            sessions = make_session_factory(engine)
            origin = settings.state_dir.name
            with sessions.begin() as session:
                items = [(fact_in(e), Origin("bench", origin, f"item {i}")) for i, e in enumerate(examples)]
                added = intake.add_facts(session=session, items=items)
            history = open_model_state(settings, env.loaded, sessions)
            service = ServiceState()
            loop = EditLoop(
                settings, sessions, history, env.loaded, env.references, Metrics(CollectorRegistry()), service,
                threading.Event(),
            )
            loop.attach_editor(env.editor, f"bench-{env.info['editor']['editor_safetensors_sha256'][:12]}")
            assert loop.gated is not None
            run = LoopRun(loop, service, sessions, history.state, list(added.fact_ids), loop.gated)
            # Observe-only timers: the ledger records no per-phase times.
            setattr(run.gated, "edit", run.edits.wrap(run.gated.edit))  # noqa: B010
            setattr(run.gated.checker, "measure", run.measures.wrap(run.gated.checker.measure))  # noqa: B010
            setattr(history, "commit", run.commits.wrap(history.commit))  # noqa: B010
            yield run
        finally:
            engine.dispose()


def probe_point(
    env: Env, state: WeightState, suite: ProbeSuite, policy: DriftPolicy, batch: int, committed: int
) -> dict[str, Any]:
    clock = Clock()
    with state.writing():  # the first run computes base references by swapping the base weights in
        report = suite.run(env.loaded.model, env.loaded.tokenizer)
    decision = policy.decide(report)
    return {
        "batch": batch,
        "version": state.version,
        "facts_committed": committed,
        "accuracy": report.accuracy,
        "base_accuracy": report.base_accuracy,
        "accuracy_change": report.accuracy_change,
        "flip_rate": report.flip_rate,
        "tasks": {t.task: {"accuracy": t.accuracy, "base": t.base_accuracy, "flip": t.flip_rate} for t in report.tasks},
        "drift_action": decision.action,
        "reasons": list(decision.reasons),
        "load1": load1(),
        **clock.read(),
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _sum(values: Sequence[float]) -> float:
    return round(sum(values), 3)


def gate_numbers(scores: dict[str, float]) -> dict[str, float]:
    """The gate's final measurement of the committed facts, as the loop recorded it: efficacy, agreement, KL
    (the per-batch ones against the model before the batch only when that was measured)."""
    return {key: round(scores[name], digits) for name, (key, digits) in GATE_SCORES.items() if name in scores}


def batch_record(
    index: int,
    report: BatchReport,
    scores: dict[str, float],
    verdict: dict[str, Any],
    run: LoopRun,
    env: Env,
    clock: dict[str, float],
    load_before: float,
) -> dict[str, Any]:
    """One batch: the gate run the loop recorded for it (`scores`, `verdict`), its report and the timers."""
    outcomes = verdict.get("outcomes", [])
    result: BatchResult | None = run.edits.last
    phases = result.phases if result is not None else {}
    edit_s = result.edit_seconds if result is not None else 0.0
    check_s = phases.get("check", 0.0)
    proposes, measures = env.proposes, run.measures
    record: dict[str, Any] = {
        "batch": index,
        "statuses": _count(o["status"] for o in outcomes),
        "version": run.state.version,
        "gate_edits": verdict.get("edits", 0),
        "blocked": verdict.get("blocked") is not None,
        "edit_s": round(edit_s, 3),
        "check_s": round(check_s, 3),
        "check_over_edit": round(check_s / edit_s, 4) if edit_s else None,
        "proposes": len(proposes.wall),
        "first_propose_s": proposes.wall[0] if proposes.wall else None,
        "propose_cpu_s": _sum(proposes.cpu),
        "measures": len(measures.wall),
        "check_cpu_s": _sum(measures.cpu),
        "check_over_edit_cpu": round(sum(measures.cpu) / sum(proposes.cpu), 4) if sum(proposes.cpu) else None,
        "commit_s": _sum(run.commits.wall),
        "load1_before": load_before,
        "load1_after": load1(),
        **clock,
    }
    record |= gate_numbers(scores)
    record["pre_batch_measured"] = verdict.get("pre_batch") is not None
    record["outcomes"] = [
        {"fact": run.example(o["fact"]), "status": o["status"][0]}
        | {k: round(float(o["numbers"][k]), 4) for k in OUTCOME_NUMBERS if k in o["numbers"]}
        for o in outcomes
    ]
    if report.version is not None and result is not None and result.plan is not None and result.plan.steps:
        record["edit_loss"] = [round(s.edit_loss, 4) for s in result.plan.steps]
    return record


def _count(values: Iterator[str] | Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def final_scores(env: Env, committed: set[int]) -> dict[str, Any]:
    clock = Clock()
    evaluation = evaluate_examples(
        env.loaded.model, env.loaded.tokenizer, env.examples, reference=env.base_eval.reference, batch_size=16
    )
    keys = sorted(committed)
    retention = evaluation.retention or []

    def pooled(rows: Sequence[Sequence[float]], chosen: Sequence[int] | None = None) -> float | None:
        picked = [rows[i] for i in (chosen if chosen is not None else range(len(rows)))]
        values = [v for row in picked for v in row]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "efficacy": _mean(evaluation.efficacy),
        "efficacy_committed": _mean([evaluation.efficacy[i] for i in keys]),
        "generalisation": pooled(evaluation.generalisation),
        "generalisation_committed": pooled(evaluation.generalisation, keys),
        "retention": pooled(retention),
        "locality_gold_accuracy": pooled(evaluation.specificity),
        "efficacy_per_fact": [round(v, 3) for v in evaluation.efficacy],
        **clock.read(),
    }


def fact_outcomes(run: LoopRun, last_outcome: dict[int, str]) -> tuple[list[str], list[int]]:
    """Each example's end state in the ledger (a pending one: `not_applied_<its last gate outcome>`) and attempts."""
    facts = run.facts()
    status, attempts = [], []
    for i, fid in enumerate(run.fact_ids):
        state, tries = facts[fid]
        status.append(state.value if state != FactStatus.PENDING else "not_applied_" + last_outcome.get(i, "never_tried"))
        attempts.append(tries)
    return status, attempts


def run_stream(env: Env, name: str, config: GateConfig, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One run of the edit loop over the stream; `save(partial)` after every batch and probe run."""
    args = env.args
    suite = ProbeSuite.from_config(config, env.references)
    policy = DriftPolicy(config)
    out: dict[str, Any] = {
        "run": name,
        "gate": config.model_dump(mode="json"),
        "batches": [],
        "probes": [],
        "complete": False,
        "load1_start": load1(),
    }
    run_clock = Clock()
    max_batches = args.max_batches or 4 * -(-len(env.examples) // args.batch_size)
    with temporary_loop(env, config, env.examples, args.batch_size) as run:
        last_outcome: dict[int, str] = {}  # example -> its last gate outcome (for facts left pending)
        committed_so_far, index = 0, 0
        while index < max_batches and run.pending():
            index += 1
            env.proposes.reset()
            run.reset()
            load_before = load1()
            clock = Clock()
            report = run.loop.run_batch()
            scores, verdict = run.new_gate_run()
            record = batch_record(index, report, scores, verdict, run, env, clock.read(), load_before)
            out["batches"].append(record)
            for outcome in verdict.get("outcomes", []):
                last_outcome[run.example(outcome["fact"])] = outcome["status"]
            committed_so_far += len(report.committed)
            print(
                f"[{name}] batch {index}: {record['statuses']} edits {record['gate_edits']} "
                f"edit {record['edit_s']:.1f}s check {record['check_s']:.1f}s wall {record['wall_s']:.1f}s "
                f"cpu {record['cpu_s']:.1f}s load {record['load1_after']} committed {committed_so_far} "
                f"pending {run.pending()} agreement {record.get('agreement')} kl {record.get('mean_kl')}",
                flush=True,
            )
            if args.probe_every and index % args.probe_every == 0:
                out["probes"].append(probe_point(env, run.state, suite, policy, index, committed_so_far))
                print(f"[{name}] probes after batch {index}: {json.dumps(out['probes'][-1])[:400]}", flush=True)
            save(out)
            paused = run.service.now().pause_reason
            if paused is not None:
                # The daemon would edit no more until an operator acts: the run ends here.
                out["stopped"] = f"editing paused: {paused}"
                break
        out["edit_wall_s"] = run_clock.read()
        frozen = run.gated.frozen
        out["frozen_layers"] = (
            None
            if frozen is None
            else {"first_edited_layer": frozen.first_edited, "rows_cached": frozen.hits, "rows_run": frozen.misses}
        )
        status, attempts = fact_outcomes(run, last_outcome)
        committed = {i for i, s in enumerate(status) if s == "committed"}
        out["counts"] = dict(sorted(_count(status).items()))
        out["fact_status"] = status
        out["fact_attempts"] = attempts
        out["version"] = run.state.version
        last = out["probes"][-1] if out["probes"] else None
        if last is None or last["batch"] != index:
            out["probes"].append(probe_point(env, run.state, suite, policy, index, len(committed)))
        out["final_probes"] = out["probes"][-1]
        save(out)
        out["final"] = final_scores(env, committed)
    out["timing"] = timing_summary(out["batches"])
    out["total"] = run_clock.read()
    out["load1_end"] = load1()
    out["complete"] = True
    save(out)
    return out


class FixedPrompts(BatchChecker):
    """A checker that always uses the given extra prompts (a single fact measured as the bisection measures it)."""

    def __init__(self, checker: BatchChecker, prompts: Sequence[str]) -> None:
        super().__init__(checker.config, checker.specificity)
        self.prompts = list(prompts)

    def measure(
        self,
        model: Any,
        tokenizer: Any,
        facts: Sequence[GateFact],
        extra_prompts: Sequence[str] = (),
        frozen: FrozenLayers | None = None,
    ) -> BatchMeasurement:
        return super().measure(model, tokenizer, facts, self.prompts, frozen)


def held_out_train_facts(env: Env, data: Path) -> tuple[list[EditExample], dict[str, Any]]:
    """zsre_train facts the editor was not trained on: the rest of `editing.engine.training.make_batches`' shuffle."""
    training = env.info["editor"]
    options = training.get("training_options") or {}
    examples = load_examples(f"zsre:{data / 'zsre' / 'zsre_train.json'}", seed=int(options.get("seed", 0)))
    order = list(examples)
    random.Random(int(options.get("seed", 0))).shuffle(order)
    size = int(options.get("batch_size", 16))
    count = len(order) // size
    if options.get("n_batches"):
        count = min(count, int(options["n_batches"]))
    used = count * size
    same = examples_hash(examples) == training.get("training_data_hash")
    return order[used:], {"training_facts_skipped": used, "training_data_hash_matches": same}


def calibrate(
    env: Env, data: Path, n: int, *, singles: bool = True, sequence: int = 0, probe_items: int | None = None
) -> dict[str, Any]:
    """On held-out zsre_train facts: one batch of `n` and (with `singles`) each of its facts alone, edited
    from the base model; then (with `sequence`) that many batches committed one after the other, with the
    gate's numbers and the probes after each. Settings are chosen on these numbers, never on the dev facts.
    """
    reset_to_base(env)
    facts, meta = held_out_train_facts(env, data)
    batch = [GateFact(i, e) for i, e in enumerate(facts[:n])]
    config = GateConfig(enabled=False)
    checker = FixedPrompts(BatchChecker.from_config(config, env.references), locality_prompts(batch))
    gated = GatedEditor(env.editor, env.state, Gate(config), checker)
    clock = Clock()

    def numbers(result: BatchResult) -> dict[str, float]:
        final = result.verdict.final
        assert final is not None
        spec = final.specificity
        efficacy = list(final.efficacy.values())
        return {
            "efficacy": round(sum(efficacy) / len(efficacy), 4),
            "agreement": round(spec.agreement, 4),
            "mean_kl": round(spec.mean_kl, 5),
            "max_kl": round(spec.max_kl, 4),
            "prompts": spec.n_prompts,
        }

    whole = numbers(gated.edit(batch))
    print(f"[calibration] whole batch of {len(batch)}: {whole}", flush=True)
    single = []
    for fact in batch if singles else []:
        single.append(numbers(gated.edit([fact])))  # on the whole batch's prompts, as the bisection measures
        print(f"[calibration] fact {fact.key}: {single[-1]}", flush=True)
    out = {"facts": len(batch), **meta, "whole_batch": whole, "single_facts": single}
    out["sequence"] = (
        calibration_sequence(env, facts, n, sequence, probe_items, max(1, env.args.calibrate_probe_every))
        if sequence
        else []
    )
    reset_to_base(env)
    return out | clock.read()


def calibration_sequence(
    env: Env, facts: Sequence[EditExample], size: int, batches: int, probe_items: int | None, probe_every: int = 1
) -> list[dict[str, Any]]:
    """Commit `batches` held-out zsre_train batches with the edit loop, gate off; after each, the gate's
    numbers and (every `probe_every` batches and after the last) the probes."""
    probe_options: dict[str, Any] = {"probe_data": env.args.data / "glue_probes"}
    if probe_items is not None:
        probe_options["probe_items"] = probe_items
    probe_config = GateConfig(**probe_options)
    suite, policy = ProbeSuite.from_config(probe_config, env.references), DriftPolicy(probe_config)
    out = []
    with temporary_loop(env, GateConfig(enabled=False), facts[: batches * size], size) as run:
        for k in range(batches):
            report = run.loop.run_batch()
            numbers = gate_numbers(run.new_gate_run()[0])
            assert report.version is not None and numbers, f"an ungated batch did not commit: {report}"
            entry: dict[str, Any] = {"batch": k + 1, "agreement": numbers["agreement"], "mean_kl": numbers["mean_kl"]}
            if (k + 1) % probe_every == 0 or k + 1 == batches:
                point = probe_point(env, run.state, suite, policy, k + 1, (k + 1) * size)
                entry |= {
                    "probe_accuracy": point["accuracy"],
                    "probe_base_accuracy": point["base_accuracy"],
                    "flip_rate": point["flip_rate"],
                    "drift_action": point["drift_action"],
                }
            out.append(entry)
            print(f"[calibration] sequence {out[-1]}", flush=True)
    return out


def tuned_settings(sequence: Sequence[dict[str, Any]], config: GateConfig) -> dict[str, Any]:
    """Per-batch thresholds from held-out zsre_train batches committed without a gate (`calibration_sequence`).

    Rule: take the last calibration batch after which the periodic probes still passed the drift policy
    (`max_accuracy_drop`, `max_flip_rate`), or the first batch when none passed; the per-batch thresholds
    become the loosest gate numbers measured up to that batch (lowest agreement, rounded down to 0.01;
    highest mean KL, rounded up to 0.01), so the gate admits about as much drift as the probes tolerated
    there. Isolation is turned off: sub-batches of a trained editor move the model more than the whole
    batch (the calibration's single facts), so bisection cannot find a passing subset.
    """
    probed = [p for p in sequence if "drift_action" in p]
    passing = [p["batch"] for p in probed if p["drift_action"] == "continue"]
    limit = max(passing) if passing else 1
    upto = [p for p in sequence if p["batch"] <= limit]
    agreement = math.floor(min(p["agreement"] for p in upto) * 100) / 100
    kl = math.ceil(max(p["mean_kl"] for p in upto) * 100) / 100
    return {"min_agreement": agreement, "max_kl": kl, "isolate_harmful": False, "calibrated_on_batches": limit}


def timing_summary(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float | None]:
        values = [float(b[key]) for b in batches if b.get(key) is not None]
        if not values:
            return {"median": None, "mean": None, "min": None, "max": None}
        return {
            "median": round(statistics.median(values), 4),
            "mean": round(statistics.fmean(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }

    edit_total = sum(b["edit_s"] for b in batches)
    check_total = sum(b["check_s"] for b in batches)
    return {
        "batches": len(batches),
        "edit_s": stats("edit_s"),
        "check_s": stats("check_s"),
        "first_propose_s": stats("first_propose_s"),
        "wall_s": stats("wall_s"),
        "cpu_s": stats("cpu_s"),
        "gate_edits": stats("gate_edits"),
        "check_over_edit": stats("check_over_edit"),
        "check_over_edit_cpu": stats("check_over_edit_cpu"),
        "check_over_edit_pooled": round(check_total / edit_total, 4) if edit_total else None,
        "load1": stats("load1_after"),
    }


def settings_key(info: dict[str, Any]) -> dict[str, Any]:
    return {
        k: info.get(k) for k in ("model_fingerprint", "facts", "facts_hash", "batch_size", "probe_every", "probe_items")
    } | {"editor": info["editor"]["editor_safetensors_sha256"]}


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one run (top-level `gated` / `ungated` objects of gate.json).

    `gate_time_fraction` is the gate's measuring time over the edit time (`propose` + encoding), summed
    over all batches of the run (isolation re-edits on both sides); the per-batch median is beside it.
    """
    final, timing, probes = run["final"], run["timing"], run["final_probes"]
    return {
        "facts_committed": run["counts"].get("committed", 0),
        "efficacy": final["efficacy"],
        "efficacy_committed": final.get("efficacy_committed"),
        "generalisation": final["generalisation"],
        "retention": final["retention"],
        "probe_accuracy": probes["accuracy"],
        "base_probe_accuracy": probes["base_accuracy"],
        "probe_flip_rate": probes["flip_rate"],
        "gate_time_fraction": timing.get("check_over_edit_pooled"),
        "gate_time_fraction_median_batch": timing["check_over_edit"]["median"],
        "gate_seconds_per_batch_median": timing["check_s"]["median"],
        "edit_seconds_per_batch_median": timing["edit_s"]["median"],
        "stopped": run.get("stopped"),
    }


def assemble(out: Path, info: dict[str, Any], command: str) -> None:
    """gate.json and gate.md from every finished run with the same settings as `info`."""
    runs: dict[str, Any] = {}
    for name in RUNS:
        path = partial_path(out, name)
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        if stored["run"].get("complete") and settings_key(stored["info"]) == settings_key(info):
            runs[name] = stored["run"]
            runs[name]["command"] = stored.get("command")
    result: dict[str, Any] = {"info": info, "command": command, "runs": runs}
    result |= {name: run_summary(run) for name, run in runs.items()}
    for part in ("calibration", "calibration-sequence"):
        calibration = partial_path(out, part)
        if not calibration.is_file():
            continue
        stored = json.loads(calibration.read_text())
        if stored["info"]["model_fingerprint"] == info["model_fingerprint"] and (
            stored["info"]["editor"]["editor_safetensors_sha256"] == info["editor"]["editor_safetensors_sha256"]
        ):
            result[part.replace("-", "_")] = stored["calibration"] | {"command": stored.get("command")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def partial_path(out: Path, name: str) -> Path:
    return PARTIAL / f"{out.stem}-{name}.json"


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    info, runs = result["info"], result["runs"]
    editor = info["editor"]
    lines = [
        "# Gated against ungated lifelong editing (SmolLM2-135M-Instruct, ZsRE dev, CPU)",
        "",
        f"Produced by `bench/gate.py` (`{result['command']}`). Model fingerprint `{info['model_fingerprint'][:16]}…`; "
        f"edited modules {', '.join(info['edited_modules'])}. Editor `{editor['path']}` "
        f"(editor.safetensors sha256 `{editor['editor_safetensors_sha256'][:16]}…`): {editor['mode']}, S = {editor['steps']}, "
        f"rank {editor['rank']}, {editor['n_blocks']} blocks, trained on {editor['training_examples']} examples of "
        f"`{editor['training_data']}` ({editor['optimiser_steps']} optimiser steps). {info['facts']} facts of zsre_dev "
        f"in batches of {info['batch_size']}; torch {info['torch']}, {info['threads']} threads, 2 shared cores.",
        "",
        f"Unedited model on these facts: efficacy {_f(info['base'].get('efficacy'))}, generalisation "
        f"{_f(info['base'].get('generalisation'))}, locality gold accuracy {_f(info['base'].get('specificity'))}.",
        "",
        "| | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]

    def row(label: str, value: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(value(r) for r in runs.values()) + " |")

    row(
        "facts committed / rejected / failed / other",
        lambda r: (
            " / ".join(str(r["counts"].get(s, 0)) for s in ("committed", "rejected", "failed"))
            + f" / {sum(v for k, v in r['counts'].items() if k not in ('committed', 'rejected', 'failed'))}"
        ),
    )
    row("batches (gate edits in all)", lambda r: f"{len(r['batches'])} ({sum(b['gate_edits'] for b in r['batches'])})")
    row("efficacy, final model, all facts", lambda r: _f(r["final"]["efficacy"]))
    row("efficacy, final model, committed facts", lambda r: _f(r["final"]["efficacy_committed"]))
    row(
        "generalisation, all / committed",
        lambda r: f"{_f(r['final']['generalisation'])} / {_f(r['final']['generalisation_committed'])}",
    )
    row("retention (top-1 agreement with the base, locality prompts)", lambda r: _f(r["final"]["retention"]))
    row("locality gold-answer accuracy", lambda r: _f(r["final"]["locality_gold_accuracy"]))
    row(
        "probe accuracy, final (base)",
        lambda r: f"{_f(r['final_probes']['accuracy'])} ({_f(r['final_probes']['base_accuracy'])})",
    )
    row("probe flip rate, final", lambda r: _f(r["final_probes"]["flip_rate"]))
    row("drift policy on the final probes", lambda r: r["final_probes"]["drift_action"])
    row(
        "gate-measured agreement / mean KL, last commit",
        lambda r: next(
            (
                f"{_f(b.get('agreement'))} / {_f(b.get('mean_kl'), 4)}"
                for b in reversed(r["batches"])
                if "agreement" in b
            ),
            "–",
        ),
    )
    row(
        "edit s per batch, median (mean)",
        lambda r: f"{_f(r['timing']['edit_s']['median'], 1)} ({_f(r['timing']['edit_s']['mean'], 1)})",
    )
    row(
        "check s per batch, median (mean)",
        lambda r: f"{_f(r['timing']['check_s']['median'], 1)} ({_f(r['timing']['check_s']['mean'], 1)})",
    )
    row(
        "check / edit per batch, median (mean), wall",
        lambda r: (
            f"{_f(r['timing']['check_over_edit']['median'], 2)} ({_f(r['timing']['check_over_edit']['mean'], 2)})"
        ),
    )
    row(
        "gate_time_fraction: check / edit, all batches together (target <= 0.5)",
        lambda r: _f(r["timing"].get("check_over_edit_pooled"), 2),
    )
    row(
        "check / edit per batch, median (mean), CPU",
        lambda r: (
            f"{_f(r['timing']['check_over_edit_cpu']['median'], 2)} "
            f"({_f(r['timing']['check_over_edit_cpu']['mean'], 2)})"
        ),
    )
    row(
        "batch wall s, median (mean)",
        lambda r: f"{_f(r['timing']['wall_s']['median'], 1)} ({_f(r['timing']['wall_s']['mean'], 1)})",
    )
    row(
        "run wall / CPU s (probes and final evaluation included)",
        lambda r: f"{r['total']['wall_s']:.0f} / {r['total']['cpu_s']:.0f}",
    )
    row(
        "load average (1 min) during the batches, min–max",
        lambda r: f"{_f(r['timing']['load1']['min'], 1)}–{_f(r['timing']['load1']['max'], 1)}",
    )
    lines += [
        "",
        "Periodic probes (pooled accuracy / flip rate / drift action; base accuracy "
        f"{_f(next(iter(runs.values()))['final_probes']['base_accuracy']) if runs else '–'}):",
        "",
    ]
    lines += [
        "| run | after batch | version | facts committed | accuracy | flip rate | action |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        for p in r["probes"]:
            lines.append(
                f"| {name} | {p['batch']} | {p['version']} | {p['facts_committed']} | {_f(p['accuracy'])} | "
                f"{_f(p['flip_rate'])} | {p['drift_action']} |"
            )
    lines += [
        "",
        "Gate-measured specificity of the live model after each commit (standing prompts + the batch's "
        "locality prompts; agreement / mean KL):",
        "",
    ]
    for name, r in runs.items():
        curve = ", ".join(
            f"{b['batch']}: {_f(b.get('agreement'), 2)}/{_f(b.get('mean_kl'), 3)}"
            for b in r["batches"]
            if "agreement" in b
        )
        lines.append(f"- {name}: {curve}")
    calibration = result.get("calibration")
    if calibration:
        whole, singles = calibration["whole_batch"], calibration["single_facts"]
        kls = sorted(x["mean_kl"] for x in singles)
        agreements = sorted(x["agreement"] for x in singles)
        lines += [
            "",
            f"Calibration on {calibration['facts']} held-out zsre_train facts (not among the editor's training facts; "
            f"`{calibration.get('command')}`), each edit from the base model, measured on the standing prompts plus "
            "the batch's locality prompts:",
            "",
            f"- the whole batch: efficacy {_f(whole['efficacy'])}, agreement {_f(whole['agreement'])}, "
            f"mean KL {_f(whole['mean_kl'], 4)} nats",
            f"- each fact alone: mean KL min {_f(kls[0], 4)}, median {_f(statistics.median(kls), 4)}, max "
            f"{_f(kls[-1], 4)}; agreement min {_f(agreements[0])}, median {_f(statistics.median(agreements))}, "
            f"max {_f(agreements[-1])}; efficacy mean {_f(statistics.fmean(x['efficacy'] for x in singles))}",
        ]
    sequence = (result.get("calibration_sequence") or {}).get("sequence") or (calibration or {}).get("sequence")
    if sequence:
        lines += [
            "",
            "Held-out zsre_train batches committed one after the other without a gate (gate-measured agreement / "
            "mean KL of each batch on standing + its locality prompts; probes after it):",
            "",
            "| batches committed | agreement | mean KL | probe accuracy (base) | flip rate | drift policy |",
            "|---|---|---|---|---|---|",
        ]
        for point in sequence:
            lines.append(
                f"| {point['batch']} | {_f(point['agreement'])} | {_f(point['mean_kl'], 4)} | "
                f"{_f(point.get('probe_accuracy'))} ({_f(point.get('probe_base_accuracy'))}) | "
                f"{_f(point.get('flip_rate'))} | {point.get('drift_action', '–')} |"
            )
    if "tuned" in runs:
        defaults = GateConfig().model_dump(mode="json")
        changed = {k: v for k, v in runs["tuned"]["gate"].items() if defaults.get(k) != v and not k.startswith("probe")}
        lines += ["", f"The `tuned` run's gate settings differ from the defaults in {json.dumps(changed)}."]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--editor", type=Path, default=DEFAULT_EDITOR, help="trained editor checkpoint directory")
    parser.add_argument("--facts", type=int, default=512, help="ZsRE dev facts to edit (the first N)")
    parser.add_argument(
        "--editor-option", action="append", default=[], metavar="FIELD=VALUE",
        help="edit-time [editor] setting, e.g. project_out_mean_key=true (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="facts per edit batch")
    parser.add_argument(
        "--probe-every", type=int, default=8, help="run the probes every N batches (0: only at the end)"
    )
    parser.add_argument("--probe-items", type=int, default=None, help="override gate.probe_items (quick runs)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop a run after this many batches")
    parser.add_argument("--runs", default="gated,ungated", help="comma-separated: gated, ungated, tuned")
    parser.add_argument(
        "--tuned",
        default=None,
        help="gate settings of the 'tuned' run: JSON, or 'auto' (from the calibration sequence)",
    )
    parser.add_argument(
        "--calibrate", type=int, default=0, help="first measure N held-out zsre_train facts alone and together"
    )
    parser.add_argument("--no-singles", action="store_true", help="calibration: skip the facts alone")
    parser.add_argument(
        "--calibrate-batches", type=int, default=0, help="calibration: commit this many batches one after the other"
    )
    parser.add_argument("--calibrate-probe-every", type=int, default=2, help="calibration: probes every N batches")
    parser.add_argument("--out", type=Path, default=RESULTS / "gate.json")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {RUNS}")
    command = "python -m bench.gate " + " ".join(sys.argv[1:] if argv is None else argv)
    env = setup(args)
    env.info["load1_start"] = load1()
    print(f"set up: {json.dumps(env.info)[:600]}", flush=True)
    overrides: dict[str, Any] = {"probe_data": args.data / "glue_probes"}
    if args.probe_items is not None:
        overrides["probe_items"] = args.probe_items
    config = GateConfig(**overrides)
    env.info["probe_items"] = config.probe_items
    if args.calibrate:
        calibration = calibrate(
            env,
            args.data,
            args.calibrate,
            singles=not args.no_singles,
            sequence=args.calibrate_batches,
            probe_items=args.probe_items,
        )
        path = partial_path(args.out, "calibration" if not args.no_singles else "calibration-sequence")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": env.info, "command": command, "calibration": calibration}, indent=1) + "\n")
    tuned: dict[str, Any] = {}
    if args.tuned == "auto":
        stored = json.loads(partial_path(args.out, "calibration-sequence").read_text())["calibration"]
        tuned = tuned_settings(stored["sequence"], config)
    elif args.tuned:
        tuned = json.loads(args.tuned)
    env.info["tuned"] = tuned
    for name in names:
        path = partial_path(args.out, name)
        path.parent.mkdir(parents=True, exist_ok=True)

        def save(run: dict[str, Any], path: Path = path) -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"info": env.info, "command": command, "run": run}, indent=1) + "\n")
            tmp.replace(path)

        if name == "ungated":
            run_config = config.model_copy(update={"enabled": False})
        elif name == "tuned":
            if not tuned:
                parser.error("the tuned run needs --tuned '{\"max_kl\": ...}' (gate settings chosen on zsre_train)")
            run_config = GateConfig(
                **(config.model_dump() | {k: v for k, v in tuned.items() if k in GateConfig.model_fields})
            )
        else:
            run_config = config
        run_stream(env, name, run_config, save)
        assemble(args.out, env.info, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
