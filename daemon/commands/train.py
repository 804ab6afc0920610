"""`python -m editing.train`: meta-train an editor for the configured model and write its checkpoint.

    python -m editing.train --data zsre:../shared/data/zsre/zsre_train.json --n-batches 60
    python -m editing.train --data synthetic:2000 --mode batch --steps 2 --rank 256 --output /tmp/editor

The model comes from `[model]` of the settings, loaded as the daemon loads it; the editor's shape from
`[editor]`; the options below override both. The checkpoint (editor.safetensors + editor_config.json)
goes to `--output`, by default the editor directory of the settings (`[editor] checkpoint` or
`<state_dir>/editor`), written atomically as the daemon's first run writes it (`daemon.bootstrap.save_editor`):
a daemon starting meanwhile finds the old checkpoint or the new one, never half of one.
Exit codes: 0 written, 1 training failed (bad data, a model that cannot be loaded), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from daemon.bootstrap import command_parser, command_settings, load_model, save_editor

logger = logging.getLogger("editing.train")

PROG = "python -m editing.train"


def build_parser() -> argparse.ArgumentParser:
    from editing.engine.training import TrainingOptions

    parser = command_parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic:1000", help="zsre:PATH | counterfact:PATH | synthetic:N")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many examples")
    parser.add_argument("--modules", default=None, help="comma-separated edited modules (default: [model] edit_modules)")
    parser.add_argument("--output", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--mode", choices=["sequential", "batch"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="S, editing steps per batch")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--n-blocks", type=int, default=None)
    parser.add_argument("--edit-lr", type=float, default=None, help="initial step size η")
    parser.add_argument(
        "--key-covariance", type=float, default=None,
        help="γ of the key covariance term: measure the key statistics and train through that solve",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for option in fields(TrainingOptions):
        if option.name == "seed":
            continue
        flag = "--" + option.name.replace("_", "-")
        if option.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif option.name == "locality":
            parser.add_argument(flag, choices=["none", "kl"], default=None)
        else:
            kind = int if option.type in ("int", int) else float
            parser.add_argument(flag, type=kind, default=None, help=f"default {option.default}")
    return parser


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    from editing.data import examples_hash, load_examples
    from editing.engine.checkpoint import checkpoint_info
    from editing.engine.emsedit import EMSEditor
    from editing.engine.training import TrainingOptions, meta_train
    from editing.errors import EditingError
    from editing.model.targets import default_edit_modules

    settings = command_settings(args, prog=PROG)
    if settings is None:
        return 2
    editor_config = settings.editor.model_copy(
        update=_overrides(args, ["mode", "steps", "rank", "n_blocks", "edit_lr", "key_covariance", "seed"])
    )
    option_names = [f.name for f in fields(TrainingOptions) if f.name != "seed"]
    options = TrainingOptions(**_overrides(args, option_names), seed=editor_config.seed)
    try:
        loaded = load_model(settings)
        names = args.modules.split(",") if args.modules else settings.model.edit_modules
        names = names or default_edit_modules(loaded.model_type, loaded.num_layers)
        examples = load_examples(args.data, limit=args.limit, seed=editor_config.seed)
        editor = EMSEditor(loaded.model, loaded.tokenizer, names, editor_config)
        logger.info("training an editor for %d modules on %d examples (%s)", len(names), len(examples), args.data)
        report = meta_train(editor, examples, options, progress=not args.no_progress)
        training = {"data": args.data, "data_hash": examples_hash(examples), "n_examples": len(examples)}
        training |= {"options": asdict(options), "optimiser_steps": report.optimiser_steps}
        training["key_covariance"] = editor_config.key_covariance
        info = checkpoint_info(editor, loaded.fingerprint, loaded.model_type, training)
        output = save_editor(args.output or settings.editor_checkpoint(), editor, info)
    except (EditingError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    logger.info("editor checkpoint written to %s", output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m editing.train`; returns the exit code."""
    return run(build_parser().parse_args(argv))
