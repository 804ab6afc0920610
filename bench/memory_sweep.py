"""The edit memory and key covariance weights on the ZsRE *training* file: untrained editors, one long stream.

Settings were chosen with this (docs/editor.md, "The edit memory"): the key statistics C are measured over the
texts of the first `--train` facts of zsre_train.json; the stream is `--batches` sequential batches of 16 facts
after its first `--offset` (the split of docs/evaluation.md, never zsre_dev.json), shuffled with the seed as
`python -m editing.evaluate` does; every metric on the final model. The editors are *untrained* (identity
hypernetworks, η = edit_lr): under the reference training schedule (one Adam step) a trained editor stays within
one step of that (docs/editor.md, "Quirks"), and leaving training out makes a 512-edit point cost minutes.

    .venv/bin/python bench/memory_sweep.py --point g0_b0:key_covariance=0,preserve_edits=0 \\
        --point g100_b1:key_covariance=100,preserve_edits=1 --threads 2

Appends one JSON line per point to bench/results/memory_sweep.jsonl (with the command and the per-batch
efficacy of the first and last 8 batches) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "zsre" / "zsre_train.json"


def parse_point(text: str) -> tuple[str, dict[str, Any]]:
    """`LABEL:field=value,...` with EditorConfig fields -> (label, changes)."""
    from editing.evaluation.methods import parse_assignments

    label, _, rest = text.partition(":")
    return label.strip(), parse_assignments(rest, f"point {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", action="append", required=True, help="LABEL:field=value,... (EditorConfig fields)")
    parser.add_argument("--data", type=Path, default=DATA, help="the ZsRE training file")
    parser.add_argument("--train", type=int, default=480, help="facts whose texts the key statistics are measured on")
    parser.add_argument("--offset", type=int, default=486, help="the stream starts after this many facts")
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_sweep.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from editing.config import EditorConfig, ModelConfig
    from editing.data import load_examples
    from editing.engine.emsedit import EMSEditor
    from editing.engine.key_covariance import key_second_moments, reference_texts
    from editing.evaluation.harness import measure_baseline, run_stream
    from editing.evaluation.methods import PreparedMethod, get_method
    from editing.evaluation.runner import EvaluationPlan, evaluation_batches
    from editing.model.loading import load_model
    from editing.model.targets import default_edit_modules

    points = [parse_point(p) for p in args.point]
    spec = f"zsre:{args.data}"
    loaded = load_model(ModelConfig(), cache_dir=Path(".cache/models"))
    names = default_edit_modules(loaded.model_type, loaded.num_layers)
    train = load_examples(spec, limit=args.train, seed=args.seed)
    plan = EvaluationPlan(methods=[get_method("emsedit2")], eval_data=spec, eval_offset=args.offset, batches=args.batches, seed=args.seed)
    batches = evaluation_batches(plan)
    baseline = measure_baseline(loaded.model, loaded.tokenizer, batches, "zsre")
    moments: dict[str, torch.Tensor] | None = None
    for label, changes in points:
        config = EditorConfig(**changes)
        torch.manual_seed(args.seed)
        editor = EMSEditor(loaded.model, loaded.tokenizer, names, config)
        if config.key_covariance > 0:
            if moments is None:
                moments = key_second_moments(loaded.model, loaded.tokenizer, editor.modules, reference_texts(train))
            editor.set_key_moments(moments)
        began = time.perf_counter()
        result = run_stream(PreparedMethod(get_method("emsedit2"), editor, names), loaded.model, loaded.tokenizer, batches, baseline, "zsre")
        per_batch = [b["efficacy"] for b in result.per_batch]
        row = {
            "point": label,
            "editor": changes,
            "final": {k: round(v, 1) for k, v in result.final.items()},
            "efficacy_first_8_batches": round(sum(per_batch[:8]) / 8, 1),
            "efficacy_last_8_batches": round(sum(per_batch[-8:]) / 8, 1),
            "edit_seconds_per_fact": round(result.edit_seconds / max(1, result.edited_facts), 3),
            "seconds": round(time.perf_counter() - began),
            "stream": {"data": str(args.data), "train": args.train, "offset": args.offset, "batches": args.batches, "seed": args.seed},
            "command": " ".join(["bench/memory_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
        }
        print(json.dumps(row), flush=True)
        with args.output.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
