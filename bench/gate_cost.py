"""The commit gate's cost and the base model's probe scores (SmolLM2-135M-Instruct, default settings).

Measures, on the real default model:

- the periodic GLUE-style probes: items per task, prompt tokens, seconds for the first run (base
  references plus the live model) and for a later run (live model only), the base model's accuracy;
- the standing-prompt fallback (no probe data configured): seconds per run;
- the per-batch check for 16 ZsRE dev facts (efficacy plus specificity on the standing prompts and the
  facts' locality prompts): seconds with the base references still to compute and once cached;
- the edit time of the same batch (`EMSEditor.propose`, S = 2, an untrained editor: the cost does not
  depend on the weights of the hypernetworks), and the check's time as a fraction of it.

    .venv/bin/python bench/gate_cost.py [--data ../shared/data]
    .venv/bin/python bench/gate_cost.py --batch-only --out bench/results/gate_cost_batch.json

Writes bench/results/gate_cost.json and .md. Timings on a shared CPU are noisy: wall and CPU seconds and
the load average are recorded (CPU seconds / threads approximates the wall time on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

from editing.config import EditorConfig, ModelConfig
from editing.data import load_zsre
from editing.engine.emsedit import EMSEditor
from editing.gate.checks import BatchChecker, GateFact, locality_prompts
from editing.gate.config import GateConfig
from editing.gate.frozen_layers import FrozenLayers
from editing.gate.probes import ProbeSuite
from editing.gate.specificity import FrozenBase, ReferenceStore
from editing.model.loading import load_model
from editing.model.targets import default_edit_modules
from editing.model.tokenise import pad_id

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).parents[1].parent / "shared" / "data"


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run fn; its result and {wall, cpu} seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}


def probe_figures(loaded: Any, config: GateConfig, save: Callable[[], None], result: dict[str, Any]) -> None:
    """Per task: the first run (base references, then the live model) and a later run (live only)."""
    suite = ProbeSuite.from_config(config, ReferenceStore(FrozenBase(loaded.fingerprint, {})))
    tasks: dict[str, Any] = {}
    result["probes"] = {"tasks": tasks}
    for task in suite.tasks:
        tokens = [len(loaded.tokenizer(p)["input_ids"]) for p in task.prompts()]
        prefix = len(loaded.tokenizer(task.prefix())["input_ids"]) if task.shots else 0
        one = ProbeSuite([task], suite.references, batch_size=config.batch_size)
        report, first = timed(lambda s=one: s.run(loaded.model, loaded.tokenizer))
        _, later = timed(lambda s=one: s.run(loaded.model, loaded.tokenizer))
        tasks[task.name] = {
            "items": len(task.items),
            "mean_prompt_tokens": sum(tokens) / len(tokens),
            "prefix_tokens": prefix,
            "first_run": first,
            "later_run": later,
            "base_accuracy": report.tasks[0].base_accuracy,
            "chance": 1.0 / len(task.items[0].choices),
        }
        save()
    total = sum(t["items"] for t in tasks.values())
    result["probes"]["pooled_base_accuracy"] = sum(t["base_accuracy"] * t["items"] for t in tasks.values()) / total
    for run in ("first_run", "later_run"):
        result["probes"][run] = {k: round(sum(t[run][k] for t in tasks.values()), 3) for k in ("wall_s", "cpu_s")}
    save()


def standing_figures(loaded: Any, config: GateConfig) -> dict[str, Any]:
    suite = ProbeSuite.from_config(
        config.model_copy(update={"probe_data": None}), ReferenceStore(FrozenBase(loaded.fingerprint, {}))
    )
    report, first = timed(lambda: suite.run(loaded.model, loaded.tokenizer))
    _, later = timed(lambda: suite.run(loaded.model, loaded.tokenizer))
    return {"prompts": report.tasks[0].n_items, "first_run": first, "later_run": later}


def batch_figures(loaded: Any, config: GateConfig, data: Path, batch: int, rounds: int = 3) -> dict[str, Any]:
    """The per-batch check against the edit, as the gate runs them: every layer, and with `FrozenLayers`
    on left-padded and on packed rows (the default).

    Per mode: one warm-up batch (standing references and, with the cache, the standing prompts' lower
    layers), then `rounds` new batches of `batch` ZsRE dev facts, each edited (`propose`; with the cache
    inside `FrozenLayers.recording`, as `GatedEditor` does) and checked twice: the first check of a
    batch computes the base references of its new locality prompts (what every batch pays), the second
    is what each further try of a bisection pays. Seconds are means over the rounds.
    """
    examples = load_zsre(data / "zsre" / "zsre_dev.json", limit=batch * (rounds + 1))
    batches = [examples[i * batch : (i + 1) * batch] for i in range(rounds + 1)]
    names = default_edit_modules(loaded.model_type, loaded.num_layers)
    editor = EMSEditor(loaded.model, loaded.tokenizer, names, EditorConfig())
    out: dict[str, Any] = {
        "facts": batch,
        "rounds": rounds,
        "prompts": {
            "standing": config.specificity_prompts,
            "locality": len(locality_prompts([GateFact(i, e) for i, e in enumerate(batches[0])])),
            "efficacy_rows": batch,
        },
    }
    for mode in ("all_layers", "frozen_layers_padded", "frozen_layers"):
        checker = BatchChecker.from_config(config, ReferenceStore(FrozenBase(loaded.fingerprint, {})))
        frozen = FrozenLayers.locate(loaded.model, names, config.frozen_layer_cache_tokens)
        if mode.startswith("frozen_layers"):
            assert frozen is not None and frozen.verify(loaded.model, pad_id(loaded.tokenizer)) is None
            assert frozen.packed
            frozen.packed = mode == "frozen_layers"  # the default: rows packed into one sequence
        else:
            frozen = None
        costs: dict[str, list[dict[str, float]]] = {"edit": [], "check_new_batch": [], "check_again": []}
        for round_ in range(rounds + 1):
            facts = [GateFact(i, e) for i, e in enumerate(batches[round_])]
            extra = locality_prompts(facts)
            with frozen.recording(loaded.model) if frozen is not None else nullcontext():
                _, edit = timed(lambda b=batches[round_]: editor.propose(b))
            check = partial(checker.measure, loaded.model, loaded.tokenizer, facts, extra, frozen)
            measurement, first = timed(check)
            _, again = timed(check)
            if round_ == 0:
                continue  # warm-up
            costs["edit"].append(edit)
            costs["check_new_batch"].append(first)
            costs["check_again"].append(again)
        means = {
            name: {k: round(sum(c[k] for c in runs) / len(runs), 3) for k in ("wall_s", "cpu_s")}
            for name, runs in costs.items()
        }
        out[mode] = {
            **means,
            "fraction_new_batch_wall": round(means["check_new_batch"]["wall_s"] / means["edit"]["wall_s"], 3),
            "fraction_new_batch_cpu": round(means["check_new_batch"]["cpu_s"] / means["edit"]["cpu_s"], 3),
            "fraction_again_wall": round(means["check_again"]["wall_s"] / means["edit"]["wall_s"], 3),
            "base_mean_efficacy": sum(measurement.efficacy.values()) / len(facts),
            "base_specificity": measurement.specificity.to_dict(),
        }
        if frozen is not None:
            out[mode]["first_edited_layer"] = frozen.first_edited
            out[mode]["rows"] = {"hits": frozen.hits, "misses": frozen.misses}
    return out


def batch_markdown(b: dict[str, Any]) -> list[str]:
    lines = [
        f"## Per-batch check ({b['facts']} ZsRE dev facts, mean of {b['rounds']} new batches)",
        "",
        f"Prompts: {b['prompts']['efficacy_rows']} efficacy rows, {b['prompts']['standing']} standing, "
        f"{b['prompts']['locality']} locality. A new batch's first check computes the base references of its "
        "locality prompts; a further try (bisection) does not.",
        "",
        "| layers run by the check | edit s (wall / CPU) | check, new batch s | check, further try s | "
        "new batch / edit (wall / CPU) | further try / edit (wall) |",
        "|---|---|---|---|---|---|",
    ]
    modes = (
        ("all_layers", "all"),
        ("frozen_layers_padded", "from the first edited one, left-padded rows"),
        ("frozen_layers", "from the first edited one, packed rows (default)"),
    )
    for mode, label in modes:
        if mode not in b:
            continue  # a report from before the mode existed
        m = b[mode]
        lines.append(
            f"| {label} | {m['edit']['wall_s']:.2f} / {m['edit']['cpu_s']:.2f} | "
            f"{m['check_new_batch']['wall_s']:.2f} / {m['check_new_batch']['cpu_s']:.2f} | "
            f"{m['check_again']['wall_s']:.2f} / {m['check_again']['cpu_s']:.2f} | "
            f"{m['fraction_new_batch_wall']:.2f} / {m['fraction_new_batch_cpu']:.2f} | {m['fraction_again_wall']:.2f} |"
        )
    m = b["frozen_layers"]
    lines += [
        "",
        f"First edited layer {m['first_edited_layer']}; rows served from the cache / run through the lower layers: "
        f"{m['rows']['hits']} / {m['rows']['misses']}. Unedited model: mean efficacy {m['base_mean_efficacy']:.3f}, "
        f"specificity {m['base_specificity']}.",
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    probes = result["probes"]
    lines = [
        "# Commit gate cost and base probe scores (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Produced by `bench/gate_cost.py`; torch threads {result['threads']}, load average at start "
        f"{result['load_average'][0]:.1f} on {os.cpu_count()} cores (a shared machine: compare CPU seconds).",
        "",
        "## Periodic probes (defaults: "
        f"{result['config']['probe_items']} items per task, {result['config']['few_shot']}-shot)",
        "",
        "| task | items | mean prompt tokens | few-shot prefix tokens | first run s (wall / CPU) | later run s (wall / CPU) | base accuracy | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in probes["tasks"].items():
        lines.append(
            f"| {name} | {t['items']} | {t['mean_prompt_tokens']:.0f} | {t['prefix_tokens']} | "
            f"{t['first_run']['wall_s']:.1f} / {t['first_run']['cpu_s']:.1f} | "
            f"{t['later_run']['wall_s']:.1f} / {t['later_run']['cpu_s']:.1f} | {t['base_accuracy']:.3f} | {t['chance']:.2f} |"
        )
    lines += ["", *batch_markdown(result["batch"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--batch", type=int, default=16, help="facts per edit batch")
    parser.add_argument("--out", type=Path, default=RESULTS / "gate_cost.json")
    parser.add_argument("--batch-only", action="store_true", help="measure only the per-batch check")
    parser.add_argument("--specificity-prompts", type=int, default=None, help="override gate.specificity_prompts")
    parser.add_argument("--batch-size", type=int, default=None, help="override gate.batch_size")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(device="cpu"))
    overrides: dict[str, Any] = {"probe_data": args.data / "glue_probes"}
    if args.specificity_prompts is not None:
        overrides["specificity_prompts"] = args.specificity_prompts
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    config = GateConfig(**overrides)
    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "config": config.model_dump(mode="json"),
    }

    def save() -> None:
        result["load_average_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result)[-300:], flush=True)

    result["batch"] = batch_figures(loaded, config, args.data, args.batch)
    save()
    if args.batch_only:
        args.out.with_suffix(".md").write_text(
            "\n".join(["# Commit gate: per-batch check cost (SmolLM2-135M-Instruct, CPU)", "", *batch_markdown(result["batch"]), ""])
        )
        return
    result["standing"] = standing_figures(loaded, config)
    save()
    probe_figures(loaded, config, save, result)
    args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
