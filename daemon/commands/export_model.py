"""`python -m daemon.ledger export-model`: the model at a version, as a Hugging Face directory or a PEFT adapter.

    python -m daemon.ledger export-model [--version V] [--format hf|peft] [--rank R|auto] OUT_DIR

The command never takes the model lock and never writes to the state directory or the ledger: it
loads the base model in its own process and rebuilds the version from the base and the ledger's
artefacts (read-only), checking the result against the weights hash the ledger recorded, as a revert
does. So it runs the same whether the daemon is running or stopped, and a running daemon keeps
serving and editing meanwhile. The genesis snapshot is checked first (the same edited modules, the
same base model, the same base weights), so a PEFT adapter's delta is taken over the base the edits
were made on.

- `--format hf` (default): a whole model directory (`editing.state.export`).
- `--format peft`: the version's delta over the base as a LoRA adapter (`editing.state.adapters`):
  exact at full rank (default), or `--rank R` / `--rank auto` for a truncated one; either way the
  logit error measured on a fixed prompt set is printed and written into `ked-export.json`.

The caller (daemon.ledger) maps the errors: ModelLoadError and ExportError are bad usage (exit 2);
LedgerError (an unknown version), ArtefactError (pruned, missing or damaged artefacts) and
EditingError (another model, a hash that does not match) refuse (exit 1).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from store import commits as store_commits
from store.errors import UnknownVersion
from store.models import Commit

if TYPE_CHECKING:
    from editing.state.history import CommitRef, ModelHistory
    from editing.state.weights import StagedWeights

FORMATS = ("hf", "peft")


def _rank(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a rank such as 64 (a whole number >= 1) or 'auto', got {text!r}")
    return int(text)


def _version(text: str) -> int:
    digits = text[1:] if text.startswith("v") else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a version such as 3 or v3 (0 is the base model), got {text!r}")
    return int(digits)


def add_export_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The export-model options: `--version`, `--format`, `--rank` and the output directory."""
    parser.add_argument("--version", type=_version, default=None, help="version to export (default: current)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: a whole Hugging Face model directory (default); peft: the version's delta as a LoRA adapter",
    )
    parser.add_argument(
        "--rank",
        type=_rank,
        default=None,
        metavar="R|auto",
        help="peft only: truncate the adapter to rank R (or the delta's numerical rank: auto); default exact",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new or empty directory")


def run_export_model(settings: Settings, read_sessions: sessionmaker[Session], args: argparse.Namespace, out: IO[str]) -> int:
    """Export the version `args` names (module docstring); prints a line, or JSON with `args.json`. Returns 0."""
    from daemon.bootstrap import load_model
    from daemon.model_state import artefact_store, check_rebuildable, commit_refs, make_history
    from editing.state.adapters import export_adapter
    from editing.state.export import ExportError, check_out_dir, export_model
    from editing.state.history import beyond_horizon, reachable_horizon
    from store.retention import BeyondHorizon

    began = time.perf_counter()
    if args.format != "peft" and args.rank is not None:
        raise ExportError("--rank applies to --format peft only (an hf export holds the whole weights)")
    check_out_dir(args.out_dir)
    store = artefact_store(settings)
    # Everything that can refuse without the model comes first: loading it takes seconds to minutes.
    with read_sessions() as session:
        current = store_commits.current_version(session)
        version = current if args.version is None else args.version
        if version != 0 and session.get(Commit, version) is None:
            raise UnknownVersion(
                f"no commit with version {version} in the ledger; see `python -m daemon.ledger log` (0 is the base model)"
            )
        try:
            check_rebuildable(store, session, version)
        except BeyondHorizon as exc:
            oldest = reachable_horizon(store, commit_refs(session), current)
            raise beyond_horizon(
                "export", version, oldest, settings.store.retention_commits, settings.store.snapshot_every, exc
            ) from None
        refs = commit_refs(session)
    loaded = load_model(settings)
    load_seconds = time.perf_counter() - began
    history = make_history(settings, loaded)
    staged = rebuild_version(history, version, refs)
    result: dict[str, Any]
    if args.format == "hf":
        info = export_model(loaded, history.state, args.out_dir, staged=staged)
        result = {"tensors": info.tensors}
        what = f"{info.tensors} tensors"
    else:
        adapter = export_adapter(loaded, history.state, args.out_dir, staged=staged, rank=args.rank)
        error = adapter.logit_error
        result = {
            "rank": adapter.rank,
            "truncated": adapter.truncated,
            "modules": adapter.modules,
            "logit_error": {"max_abs": error.max_abs, "mean_abs": error.mean_abs, "prompts": error.prompts},
            "merged_mismatches": adapter.merged_mismatches,
        }
        kind = f"truncated to rank {adapter.rank}" if adapter.truncated else f"exact, rank {adapter.rank}"
        what = (
            f"PEFT adapter, {kind}, {adapter.modules} modules; logit error on {error.prompts} fixed prompts: "
            f"max {error.max_abs:.3g}, mean {error.mean_abs:.3g} (largest logit {error.max_abs_logit:.3g})"
        )
    seconds = time.perf_counter() - began
    result = {
        "version": staged.version,
        "format": args.format,
        "out_dir": str(args.out_dir),
        "weights_sha256": staged.weights_sha256,
        **result,
        "seconds": round(seconds, 3),
        "model_load_seconds": round(load_seconds, 3),
    }
    if getattr(args, "json", False):
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        out.write(
            f"exported v{staged.version} (weights sha256 {staged.weights_sha256[:16]}…, {what}) to {args.out_dir} "
            f"in {seconds:.1f} s; rebuilt from the artefacts, a running daemon was not disturbed\n"
        )
    return 0


def rebuild_version(history: ModelHistory, version: int, refs: Mapping[int, CommitRef]) -> StagedWeights:
    """`version`'s weights rebuilt from the base and the artefacts, read-only, checked against the recorded hashes.

    The genesis snapshot is read, never written: it must name the edited modules of `history`, and the
    loaded base weights must hash as it recorded (this also makes a PEFT delta one over the right base).
    With no genesis yet (the daemon never ran on this state directory) only version 0 exists: the base.
    Raises ModelMismatch, WeightsHashMismatch, ArtefactMissing / ArtefactCorrupt, BeyondHorizon.
    """
    from editing.errors import ModelMismatch
    from store.artefacts import ArtefactKind

    store = history.store
    base = history.state.stage(0, [])
    if not store.exists(ArtefactKind.SNAPSHOT, 0):
        if version == 0:
            return base
        raise ModelMismatch(f"the state directory {store.directory} has no genesis snapshot; it cannot rebuild v{version}")
    meta = store.metadata(ArtefactKind.SNAPSHOT, 0)
    if json.loads(meta["modules"]) != history.state.module_names:
        raise ModelMismatch(
            f"the state directory's edits were made on modules {meta['modules']}, not {history.state.module_names}; "
            "export with the daemon's [model] edit_modules"
        )
    fingerprints = {history.fingerprint, *history.earlier_fingerprints}
    if meta.get("fingerprint") and meta["fingerprint"] not in fingerprints:
        raise ModelMismatch(
            f"the state directory's edits were made on another base model (fingerprint {meta['fingerprint'][:16]}…, "
            f"loaded {str(history.fingerprint)[:16]}…); export with the daemon's [model] settings"
        )
    if meta["weights_sha256"] != base.weights_sha256:
        raise ModelMismatch("the loaded base weights of the edited modules differ from those the edits were made on")
    staged, _, _ = history.stage_version(version, refs)
    return staged
