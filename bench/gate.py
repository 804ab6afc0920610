"""Gated against ungated lifelong editing of SmolLM2-135M-Instruct over the ZsRE dev stream.

Two runs from the same base model with the same trained EMSEdit editor, editing the first `--facts`
ZsRE dev facts in sequential batches of `--batch-size`, committed exactly as the daemon commits
(`GatedEditor.edit` -> `ModelHistory.commit` of `result.prepared` into a temporary artefact store,
which publishes the weights and hands the plan's normaliser statistics to the editor):

- `gated`: the default `GateConfig`. Facts the gate rejects or that run out of retries are not applied;
  facts sent back (`retry`, `deferred`) go back to the pending queue and, like the daemon's oldest-first
  claim, lead the next batch (deferred facts go after the never-deferred ones, and a fact deferred
  twice is dropped; three blocked batches in a row end the run, the rest counted as not applied).
- `ungated`: the same with `enabled = False`: every batch commits unchecked. The checker still measures
  each batch once (that is how `Gate.decide` works with the gate off), which gives the drift curve.

Reported per run: on the final model, efficacy (teacher-forced token accuracy of every fact's target on
its prompt, all facts and only the committed ones), generalisation (paraphrases), retention (top-1
agreement with the unedited model on the facts' locality prompts, `editing.model.edit_metrics.evaluate_examples`),
the locality prompts' gold-answer accuracy, the periodic GLUE-style probes (pooled accuracy, the base
model's, flip rate and what the drift policy would do; also every `--probe-every` batches), fact
counts by outcome, and per batch the edit and check seconds (wall and CPU) and their ratio.

    .venv/bin/python bench/gate.py                        # both runs, 512 facts, batches of 16
    .venv/bin/python bench/gate.py --facts 64 --probe-every 0 --out /tmp/gate-quick.json
    .venv/bin/python bench/gate.py --runs ungated         # one run; gate.json collects all finished runs

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

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
from editing.state.history import ModelHistory
from editing.state.weights import WeightState
from store.artefacts import ArtefactStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PARTIAL = RESULTS / "tmp"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_EDITOR = ROOT / ".cache" / "editors" / "emsedit-zsre"
CACHE = ROOT / ".cache"
RUNS = ("gated", "ungated", "tuned")
MAX_DEFERRALS = 2
MAX_BLOCKED_IN_A_ROW = 3


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
    """Wall and CPU seconds of every call of a wrapped method (reset per batch)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock = Clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = clock.read()
                self.wall.append(spent["wall_s"])
                self.cpu.append(spent["cpu_s"])

        return timed

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()


@dataclass
class Env:
    """What both runs share: the model and its weight state, the editor, references, data and base scores."""

    args: argparse.Namespace
    loaded: LoadedModel
    editor: EMSEditor
    state: WeightState
    references: ReferenceStore
    examples: list[EditExample]
    base_eval: EvaluationResult
    base_stats: dict[str, torch.Tensor]
    proposes: Calls
    measures: Calls
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
    loaded = load_model(ModelConfig(device="cpu"), cache_dir=CACHE / "models")
    checkpoint = load_checkpoint(args.editor)
    options = dict(_option(item) for item in args.editor_option)
    editor = build_editor(
        loaded.model, loaded.tokenizer, loaded.fingerprint, checkpoint, EditorConfig(**options),
        earlier_fingerprints=loaded.earlier_fingerprints,
    )
    names = editor.module_names
    state = WeightState(loaded.model, names)
    base = FrozenBase.capture(loaded.model, loaded.fingerprint, [f"{name}.weight" for name in names])
    references = ReferenceStore(base, directory=CACHE / "gate-bench" / "references")
    examples = load_zsre(args.data / "zsre" / "zsre_dev.json", limit=args.facts)
    load_seconds = clock.read()
    base_eval, base_eval_seconds = base_evaluation(loaded, examples)
    proposes, measures = Calls(), Calls()
    # Time every propose and every check (the gate calls them through these attributes).
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
        args,
        loaded,
        editor,
        state,
        references,
        examples,
        base_eval,
        editor.edit_state(),
        proposes,
        measures,
        info,
    )


def reset_to_base(env: Env) -> None:
    """Publish the base weights (version 0) and the editor's initial statistics."""
    env.state.publish(env.state.stage(0, []))
    env.editor.load_edit_state({k: v.clone() for k, v in env.base_stats.items()})


def probe_point(env: Env, suite: ProbeSuite, policy: DriftPolicy, batch: int, committed: int) -> dict[str, Any]:
    clock = Clock()
    with env.state.writing():  # the first run computes base references by swapping the base weights in
        report = suite.run(env.loaded.model, env.loaded.tokenizer)
    decision = policy.decide(report)
    return {
        "batch": batch,
        "version": env.state.version,
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


def batch_record(
    index: int, result: BatchResult, env: Env, clock: dict[str, float], commit_s: float, load_before: float
) -> dict[str, Any]:
    verdict = result.verdict
    counts: dict[str, int] = {}
    for outcome in verdict.outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    edit_s = result.edit_seconds
    check_s = result.phases.get("check", 0.0)
    final = verdict.final
    committed = set(verdict.committed)
    record: dict[str, Any] = {
        "batch": index,
        "statuses": counts,
        "version": env.state.version,
        "gate_edits": verdict.edits,
        "blocked": verdict.blocked is not None,
        "edit_s": round(edit_s, 3),
        "check_s": round(check_s, 3),
        "check_over_edit": round(check_s / edit_s, 4) if edit_s else None,
        "proposes": len(env.proposes.wall),
        "first_propose_s": env.proposes.wall[0] if env.proposes.wall else None,
        "propose_cpu_s": round(sum(env.proposes.cpu), 3),
        "measures": len(env.measures.wall),
        "check_cpu_s": round(sum(env.measures.cpu), 3),
        "check_over_edit_cpu": (
            round(sum(env.measures.cpu) / sum(env.proposes.cpu), 4) if sum(env.proposes.cpu) else None
        ),
        "commit_s": round(commit_s, 3),
        "load1_before": load_before,
        "load1_after": load1(),
        **clock,
    }
    if final is not None:
        record["gate_efficacy"] = _mean([final.efficacy[k] for k in final.efficacy if k in committed])
        record["agreement"] = round(final.specificity.agreement, 4)
        record["mean_kl"] = round(final.specificity.mean_kl, 5)
        if final.marginal is not None:  # against the model before the batch (measured when the base fails)
            record["batch_agreement"] = round(final.marginal.agreement, 4)
            record["batch_mean_kl"] = round(final.marginal.mean_kl, 5)
    record["pre_batch_measured"] = verdict.pre_batch is not None
    keys = ("efficacy", "agreement", "mean_kl", "batch_agreement", "batch_mean_kl")
    record["outcomes"] = [
        {"fact": int(o.key), "status": o.status[0]}
        | {k: round(float(o.numbers[k]), 4) for k in keys if k in o.numbers}
        for o in verdict.outcomes
    ]
    if result.plan is not None and result.plan.steps:
        record["edit_loss"] = [round(s.edit_loss, 4) for s in result.plan.steps]
    return record


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


def run_stream(env: Env, name: str, config: GateConfig, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One run over the stream; `save(partial)` after every batch and probe run."""
    reset_to_base(env)
    args = env.args
    checker = BatchChecker.from_config(config, env.references)
    setattr(checker, "measure", env.measures.wrap(checker.measure))  # noqa: B010
    gated = GatedEditor(env.editor, env.state, Gate(config), checker)
    suite = ProbeSuite.from_config(config, env.references)
    policy = DriftPolicy(config)
    pending: dict[int, GateFact] = {i: GateFact(i, e) for i, e in enumerate(env.examples)}
    deferrals: dict[int, int] = {}
    status: dict[int, str] = {}
    attempts: dict[int, int] = {}
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
    blocked_in_a_row = 0
    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
        history = ModelHistory(
            env.state,
            ArtefactStore(Path(tmp)),
            editor=env.editor,
            fingerprint=env.loaded.fingerprint,
            snapshot_every=0,
            retention_commits=None,
        )
        history.open({})
        index = 0
        while pending and index < max_batches:
            index += 1
            order = sorted(pending, key=lambda k: (deferrals.get(k, 0), k))[: args.batch_size]
            facts = [pending.pop(k) for k in order]
            env.proposes.reset()
            env.measures.reset()
            load_before = load1()
            clock = Clock()
            result = gated.edit(facts)
            commit_s = 0.0
            if result.prepared is not None:
                began = time.perf_counter()
                history.commit(result.prepared, version=env.state.version + 1, record=lambda rec: None)
                commit_s = time.perf_counter() - began
            record = batch_record(index, result, env, clock.read(), commit_s, load_before)
            out["batches"].append(record)
            by_key = {f.key: f for f in facts}
            for outcome in result.verdict.outcomes:
                key = int(outcome.key)
                attempts[key] = outcome.attempts
                if outcome.status in ("retry", "deferred"):
                    if outcome.status == "deferred":
                        deferrals[key] = deferrals.get(key, 0) + 1
                    if deferrals.get(key, 0) >= MAX_DEFERRALS:
                        status[key] = "deferred_out"
                    else:
                        pending[key] = replace(by_key[key], attempts=outcome.attempts)
                        status[key] = outcome.status
                else:
                    status[key] = outcome.status
            blocked_in_a_row = blocked_in_a_row + 1 if result.verdict.blocked else 0
            committed_so_far = sum(1 for s in status.values() if s == "committed")
            print(
                f"[{name}] batch {index}: {record['statuses']} edits {record['gate_edits']} "
                f"edit {record['edit_s']:.1f}s check {record['check_s']:.1f}s wall {record['wall_s']:.1f}s "
                f"cpu {record['cpu_s']:.1f}s load {record['load1_after']} committed {committed_so_far} "
                f"pending {len(pending)} agreement {record.get('agreement')} kl {record.get('mean_kl')}",
                flush=True,
            )
            if args.probe_every and index % args.probe_every == 0:
                out["probes"].append(probe_point(env, suite, policy, index, committed_so_far))
                print(f"[{name}] probes after batch {index}: {json.dumps(out['probes'][-1])[:400]}", flush=True)
            save(out)
            if blocked_in_a_row >= MAX_BLOCKED_IN_A_ROW:
                out["stopped"] = f"{blocked_in_a_row} blocked batches in a row"
                break
        for key in pending:
            status[key] = "not_applied_" + status.get(key, "never_tried")
        out["edit_wall_s"] = run_clock.read()
        frozen = gated.frozen
        out["frozen_layers"] = (
            None
            if frozen is None
            else {"first_edited_layer": frozen.first_edited, "rows_cached": frozen.hits, "rows_run": frozen.misses}
        )
        committed = {k for k, s in status.items() if s == "committed"}
        counts: dict[str, int] = {}
        for value in status.values():
            counts[value] = counts.get(value, 0) + 1
        out["counts"] = dict(sorted(counts.items()))
        out["fact_status"] = [status.get(i, "never_tried") for i in range(len(env.examples))]
        out["fact_attempts"] = [attempts.get(i, 0) for i in range(len(env.examples))]
        out["version"] = env.state.version
        last = out["probes"][-1] if out["probes"] else None
        if last is None or last["batch"] != index:
            out["probes"].append(probe_point(env, suite, policy, index, len(committed)))
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
    """Commit `batches` held-out zsre_train batches unchecked; after each, the gate's numbers and the probes."""
    reset_to_base(env)
    config = GateConfig(enabled=False)
    probe_config = (
        GateConfig(probe_data=env.args.data / "glue_probes")
        if probe_items is None
        else GateConfig(probe_data=env.args.data / "glue_probes", probe_items=probe_items)
    )
    suite, policy = ProbeSuite.from_config(probe_config, env.references), DriftPolicy(probe_config)
    gated = GatedEditor(env.editor, env.state, Gate(config), BatchChecker.from_config(config, env.references))
    out = []
    with tempfile.TemporaryDirectory(prefix="gate-calibration-") as tmp:
        history = ModelHistory(env.state, ArtefactStore(Path(tmp)), editor=env.editor, snapshot_every=0)
        history.open({})
        for k in range(batches):
            chunk = [GateFact(i, e) for i, e in enumerate(facts[k * size : (k + 1) * size])]
            result = gated.edit(chunk)
            assert result.prepared is not None and result.verdict.final is not None
            history.commit(result.prepared, version=k + 1, record=lambda rec: None)
            spec = result.verdict.final.specificity
            entry: dict[str, Any] = {
                "batch": k + 1,
                "agreement": round(spec.agreement, 4),
                "mean_kl": round(spec.mean_kl, 5),
            }
            if (k + 1) % probe_every == 0 or k + 1 == batches:
                point = probe_point(env, suite, policy, k + 1, (k + 1) * size)
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
    command = "bench/gate.py " + " ".join(sys.argv[1:] if argv is None else argv)
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
