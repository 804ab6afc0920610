"""Restart with 1,000 commits on SmolLM2: start-up time, bytes per commit, rebuild costs.

Build (not timed): a state directory with a SQLite ledger and the artefact store, then `--commits`
commits on the default model (SmolLM2-135M-Instruct, the 11 default edited modules of 576 x 1536),
each through the real commit protocol (`ModelHistory.commit`: artefact, ledger transaction with
16 facts, publish) followed by `consolidate` (snapshot every `--snapshot-every`, retention horizon
`--retention`). The deltas are SYNTHETIC, because the trained editor is not ready: each is shaped
like an EMSEdit ΔW, a sum of S=2 ridge-style updates Kᵀ·C with 48 captured rows per step (16 facts x
3 answer tokens), so rank 96 per module, at about 1e-4 per element. A pool of `--pool` such edits is
encoded once (the encoding time is measured and reported) and reused in turn; the editor state is
the real normaliser structure of EMSEdit's networks for these modules, changed at every commit.

Timed: a fresh Python process does what the daemon does at start-up: imports, load the model from
the de-quantised cache, open the ledger (migrations to head), move stuck facts back to pending, read
the commit rows, check the genesis, `recover` (remove orphans, rebuild from the newest snapshot plus
later commits, verify the recorded hash, publish). Run `--repeats` times; the worst is reported.

    .venv/bin/python -m bench.restart                   # 1,000 commits (about 20-40 min to build here)
    .venv/bin/python -m bench.restart --commits 60      # a quick look

Writes bench/results/restart.json and bench/results/restart.md. Target: start-up < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models"
FACTS_PER_COMMIT = 16
ROWS_PER_STEP = 48
STEPS = 2
TARGET_SECONDS = 60.0


def _open_ledger(state_dir: Path) -> Any:
    from store.db import make_engine, make_session_factory, upgrade_to_head

    engine = make_engine(f"sqlite:///{state_dir / 'ledger.sqlite3'}")
    upgrade_to_head(engine)
    return make_session_factory(engine)


def ledger_refs(session: Any) -> tuple[dict[int, Any], int]:
    """Every commit row as a CommitRef, and the current version (how the service wires the ledger in)."""
    from sqlalchemy import select

    from editing.state.history import CommitRef
    from store.commits import current_version
    from store.models import Commit

    refs = {
        c.version: CommitRef(c.version, c.parent_version, c.artefact_sha256, c.weights_sha256)
        for c in session.scalars(select(Commit))
    }
    return refs, current_version(session)


def _load(history_kwargs: dict[str, Any], state_dir: Path, modules: list[str] | None) -> tuple[Any, Any, Any]:
    from editing.config import ModelConfig
    from editing.model.loading import load_model
    from editing.model.targets import default_edit_modules
    from editing.state.history import ModelHistory
    from editing.state.weights import WeightState
    from store.artefacts import ArtefactStore

    loaded = load_model(ModelConfig(device="cpu"), cache_dir=MODEL_CACHE)
    names = modules or default_edit_modules(loaded.model_type, loaded.num_layers)
    state = WeightState(loaded.model, names)
    store = ArtefactStore(state_dir / "artefacts")
    return loaded, state, ModelHistory(state, store, fingerprint=loaded.fingerprint, **history_kwargs)


def _synthetic_edit(state: Any, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, base in state.base().items():
        d_in, d_out = base.shape
        total = torch.zeros(d_in, d_out)
        for _ in range(STEPS):
            keys = torch.randn(ROWS_PER_STEP, d_in, generator=gen)
            coeffs = 2e-6 * torch.randn(ROWS_PER_STEP, d_out, generator=gen)
            total = total + keys.T @ coeffs
        deltas[name] = total
    return deltas


def _editor_state(state: Any) -> dict[str, Any]:
    from editing.engine.hypernet import EditorNets

    shapes = {name: (int(b.shape[0]), int(b.shape[1])) for name, b in state.base().items()}
    return EditorNets(shapes, STEPS, 64, 1, 1e-6, False).normaliser_state()


def build(
    state_dir: Path, commits: int, pool: int, history_kwargs: dict[str, Any], modules: list[str] | None
) -> dict[str, Any]:
    """Make `commits` commits through the real protocol; returns the build's measurements."""
    from editing.state.history import prepare_commit
    from store.commits import record_commit
    from store.intake import add_facts
    from store.records import CommitIn, FactIn, Origin
    from store.work import claim_pending

    factory = _open_ledger(state_dir)
    _, state, history = _load(history_kwargs, state_dir, modules)
    with factory.begin() as session:
        items = [(FactIn(f"Synthetic fact {i} is", f"value {i}"), Origin("bench", "restart", f"item {i}")) for i in range(commits * FACTS_PER_COMMIT)]
        add_facts(session=session, items=items)
        history.open(ledger_refs(session)[0])
    base_editor = _editor_state(state)
    started = time.perf_counter()
    prepared = [prepare_commit(_synthetic_edit(state, seed), {}) for seed in range(pool)]
    encode_seconds = (time.perf_counter() - started) / pool
    commit_seconds: list[float] = []
    for version in range(1, commits + 1):
        with factory.begin() as session:
            ids = tuple(f.id for f in claim_pending(session=session, limit=FACTS_PER_COMMIT))
        edit = prepared[(version - 1) % pool]
        editor = {k: v + version if v.is_floating_point() else v for k, v in base_editor.items()}
        edit = type(edit)(edit.encoded, edit.deltas, editor, edit.stats)

        def record(rec: Any, ids: tuple[int, ...] = ids) -> None:
            with factory.begin() as session:
                row = record_commit(
                    session=session,
                    commit=CommitIn(ids, artefact_path=rec.artefact_path, artefact_sha256=rec.artefact_sha256, weights_sha256=rec.weights_sha256),
                )
                if row.version != rec.version:
                    raise RuntimeError(f"ledger version {row.version} != artefact version {rec.version}")

        tick = time.perf_counter()
        history.commit(edit, version=version, record=record)
        with factory.begin() as session:
            history.consolidate(ledger_refs(session)[0])
        commit_seconds.append(time.perf_counter() - tick)
        if version % 100 == 0:
            print(f"  {version} commits, {statistics.mean(commit_seconds[-100:]):.2f} s each", file=sys.stderr, flush=True)
    with factory.begin() as session:
        horizon = history.horizon(ledger_refs(session)[0])
    ranks = sorted({s.rank for p in prepared for s in p.stats.values()})
    errors = [s.relative_error for p in prepared for s in p.stats.values()]
    usage = history.store.usage()
    return {
        "encode_seconds_per_commit": encode_seconds,
        "commit_seconds_mean": statistics.mean(commit_seconds),
        "ranks": ranks,
        "codec_relative_error_max": max(errors),
        "horizon": horizon,
        "commit_files": usage.commit_files,
        "commit_bytes_mean": usage.mean_commit_bytes,
        "snapshot_files": usage.snapshot_files,
        "snapshot_bytes": usage.snapshot_bytes,
        "total_bytes_on_disk": usage.total_bytes,
        "dense_fp32_bytes_per_commit": sum(int(b.numel()) * 4 for b in state.base().values()),
        "final_weights_sha256": state.weights_sha256(),
        "modules": state.module_names,
    }


def startup(state_dir: Path, history_kwargs: dict[str, Any], modules: list[str] | None) -> dict[str, Any]:
    """What the daemon does at start-up, timed by phase (called in a fresh process)."""
    from store.work import reset_stuck_editing

    t0 = time.perf_counter()
    factory = _open_ledger(state_dir)
    t1 = time.perf_counter()
    _, state, history = _load(history_kwargs, state_dir, modules)
    t2 = time.perf_counter()
    with factory.begin() as session:
        reset_stuck_editing(session=session)
        refs, current = ledger_refs(session)
    history.open(refs)
    report = history.recover(refs, current)
    t3 = time.perf_counter()
    revert_start = time.perf_counter()
    history.stage_version(history.horizon(refs), refs)
    return {
        "ledger_seconds": t1 - t0,
        "model_load_seconds": t2 - t1,
        "recover_seconds": t3 - t2,
        "version": report.version,
        "rebuilt_from_snapshot": report.start,
        "replayed_commits": report.replayed,
        "weights_sha256": state.weights_sha256(),
        "stage_horizon_seconds": time.perf_counter() - revert_start,
    }


def _timed_startup(state_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "bench.restart", "--startup-only", str(state_dir), *_policy_args(args)]
    done = subprocess.run(command, cwd=REPO, check=False, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"start-up failed:\n{done.stderr[-4000:]}")
    out = done.stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["startup_seconds"] = time.perf_counter() - started  # process start, imports included
    result["case"] = "as built"
    return result


def _worst_case_startups(state_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start-ups with the newest snapshot moved aside: recovery then replays a whole snapshot interval."""
    from store.artefacts import ArtefactKind, ArtefactStore

    store = ArtefactStore(state_dir / "artefacts")
    newest = max(store.versions(ArtefactKind.SNAPSHOT))
    if newest == 0:
        return []
    aside = state_dir / "aside.safetensors"
    store.path(ArtefactKind.SNAPSHOT, newest).rename(aside)
    try:
        return [_timed_startup(state_dir, args) | {"case": "newest snapshot moved aside"} for _ in range(args.repeats)]
    finally:
        aside.rename(store.path(ArtefactKind.SNAPSHOT, newest))


def _policy_args(args: argparse.Namespace) -> list[str]:
    modules = ["--modules", args.modules] if args.modules else []
    return ["--snapshot-every", str(args.snapshot_every), "--retention", str(args.retention), *modules]


def _modules(args: argparse.Namespace) -> list[str] | None:
    return [m for m in args.modules.split(",") if m] or None


def _history_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"snapshot_every": args.snapshot_every, "retention_commits": args.retention or None}


def write_results(args: argparse.Namespace, built: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(runs, key=lambda r: r["startup_seconds"])
    bytes_per_commit = built["commit_bytes_mean"] + (built["snapshot_bytes"] / max(1, built["snapshot_files"] - 1)) / max(1, args.snapshot_every)
    result = {
        "commits": args.commits,
        "startup_seconds": worst["startup_seconds"],
        "runs": runs,
        "bytes_per_commit": round(bytes_per_commit),
        "bytes_per_commit_note": "mean commit artefact + snapshot bytes amortised over snapshot_every commits",
        "synthetic_deltas": True,
        "edited_modules_given": bool(args.modules),
        "snapshot_every": args.snapshot_every,
        "retention_commits": args.retention or None,
        "build": built,
        "startup_phases_worst": worst,
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.results_name}.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    b, w = r["build"], r["startup_phases_worst"]
    mb = 1e6
    return "\n".join(
        [
            "# Restart with many commits (SmolLM2-135M-Instruct)",
            "",
            f"`python -m bench.restart --commits {r['commits']} --snapshot-every {r['snapshot_every']} --retention {r['retention_commits']}"
            f"{' --modules ...' if r['edited_modules_given'] else ''}`. "
            "Deltas are **synthetic** (the trained editor is not ready): EMSEdit-shaped sums of 2 ridge-style updates "
            f"with 48 rows each, rank {b['ranks']} per module, on {len(b['modules'])} modules of 576 x 1536 "
            f"({', '.join(b['modules'])}); every commit goes "
            "through the real protocol (artefact, SQLite ledger transaction with 16 facts, publish) and consolidation.",
            "",
            f"Start-up (worst of all runs): **{r['startup_seconds']:.1f} s** for {r['commits']} commits; target < {TARGET_SECONDS:.0f} s.",
            "",
            "| case | start-up s | ledger s | model load s | recover s | rebuilt from snapshot | replayed commits |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {run['case']} | {run['startup_seconds']:.1f} | {run['ledger_seconds']:.1f} | {run['model_load_seconds']:.1f} | "
                f"{run['recover_seconds']:.1f} | {run['rebuilt_from_snapshot']} | {run['replayed_commits']} |"
                for run in r["runs"]
            ],
            "",
            "| storage | value |",
            "|---|---|",
            f"| bytes per commit (commit artefact + amortised snapshots) | {r['bytes_per_commit'] / mb:.2f} MB |",
            f"| mean commit artefact (int16 low-rank deltas + editor state) | {b['commit_bytes_mean'] / mb:.2f} MB |",
            f"| dense fp32 deltas, for comparison | {b['dense_fp32_bytes_per_commit'] / mb:.2f} MB |",
            f"| on disk after {r['commits']} commits ({b['commit_files']} commit files, {b['snapshot_files']} snapshots incl. genesis) | {b['total_bytes_on_disk'] / mb:.0f} MB |",
            f"| revert horizon after {r['commits']} commits | version {b['horizon']} |",
            f"| largest relative error of a canonical delta vs the editor's | {b['codec_relative_error_max']:.1e} |",
            "",
            f"Encoding one commit ({len(b['modules'])} modules) took {b['encode_seconds_per_commit']:.2f} s; a whole commit with consolidation "
            f"{b['commit_seconds_mean']:.2f} s on average; rebuilding the horizon version (snapshot + replay, verified) "
            f"{w['stage_horizon_seconds']:.1f} s. Start-up is timed from process start (imports included) to the verified, "
            "published state.",
            "",
            f"Machine: {r['machine']['cpus']} CPUs, load average at the end {[round(x, 2) for x in r['machine']['load_average']]} "
            f"(other work shares the machine), Python {r['machine']['python']}.",
            "",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=8, help="distinct synthetic edits, encoded once and reused")
    parser.add_argument("--snapshot-every", type=int, default=25)
    parser.add_argument("--retention", type=int, default=200, help="retention horizon in commits (0: keep all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--state-dir", type=Path, default=None, help="keep the built state here (default: a temp dir)")
    parser.add_argument("--modules", default="", help="comma-separated edited modules (default: the model's default)")
    parser.add_argument("--results-name", default="restart", help="file stem under bench/results/")
    parser.add_argument("--startup-only", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.startup_only is not None:
        sys.stdout.write(json.dumps(startup(args.startup_only, _history_kwargs(args), _modules(args))) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="ked-restart-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        state_dir.mkdir(parents=True, exist_ok=True)
        built = build(state_dir, args.commits, args.pool, _history_kwargs(args), _modules(args))
        runs = [_timed_startup(state_dir, args) for _ in range(args.repeats)]
        runs += _worst_case_startups(state_dir, args)
        if any(r["weights_sha256"] != built["final_weights_sha256"] for r in runs):
            raise SystemExit("a restart rebuilt other weights than the build ended with")
        result = write_results(args, built, runs)
    sys.stdout.write(f"start-up {result['startup_seconds']:.1f} s, {result['bytes_per_commit'] / 1e6:.2f} MB per commit\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
