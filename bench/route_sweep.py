"""Routed edits (editing/engine/routing.py) on the ZsRE *training* file: efficacy and locality at several thresholds.

The stream is that of bench/memory_sweep.py: `--batches` sequential batches of 16 facts after the first
`--offset` facts of zsre_train.json (never zsre_dev.json), shuffled with the seed; an *untrained* editor with
the daemon's settings otherwise (S = 2, preserve_edits 1); every metric on the final model. Points:

- mode A, post-hoc: the stream edited as today (unrouted), then evaluated routed at each τ of `--taus-a`
  ("off" = today's model), with two key stores: `editor` (each edit's last-step keys from its editor state,
  free) and `recaptured` (the edit prompts' keys taken again on the final routed model at that τ);
- mode B, while editing: every batch is edited on the routed model at τ (the model a daemon would serve);
  before the edit the batch's keys on the current routed model are stored provisionally (so its own edit
  steps reach it), after it they are replaced by its keys on the routed model with the edit applied.

Measured per point: ES and GS (teacher-forced token accuracy of the new target), retention (top-1 agreement
with the unedited model at the answer positions of the locality rows, as editing.model.edit_metrics),
confident retention (the same, pooled over the positions where the unedited top-1 probability is >= 0.5),
mean KL(unedited || edited) of the next-token distributions at those positions (per row, then over rows),
and per edited module the share of edit, paraphrase and locality positions routed on. Also the cost of a
routed forward against a plain one on a fixed batch with the final key store.

    nice -n 10 .venv/bin/python bench/route_sweep.py --threads 1 > /tmp/work/route_sweep.log 2>&1

Order: mode A's stream and its points at --recapture-taus, then mode B, then A's other thresholds (mode A's
final weights are kept meanwhile). Writes bench/results/route_sweep.{json,md,png} after every point; points already in the JSON of an earlier
run of the same stream are kept unless recomputed (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "zsre" / "zsre_train.json"
#: the unedited model's top-1 probability from which a locality position counts as confident
CONFIDENT = 0.5


@dataclass(frozen=True)
class Rows:
    """Teacher-forced rows of one kind: prompts and the answers they are forced on."""

    kind: str
    prompts: list[str]
    answers: list[str]


@dataclass
class Reference:
    """The unedited model at every locality answer position: top-1 token, its probability, log-probabilities."""

    top1: list[torch.Tensor]
    confidence: list[torch.Tensor]
    log_probs: list[torch.Tensor]


def stream_rows(facts: Sequence[Any]) -> list[Rows]:
    """The edit, paraphrase and locality rows of the facts, in that order."""
    return [
        Rows("edit", [f.prompt for f in facts], [f.target_new for f in facts]),
        Rows("paraphrase", [p for f in facts for p in f.rephrase_prompts], [f.target_new for f in facts for _ in f.rephrase_prompts]),
        Rows("locality", [p for f in facts for p, _ in f.locality], [a for f in facts for _, a in f.locality]),
    ]


@torch.no_grad()
def answer_logits(model: Any, tokenizer: Any, rows: Rows, stats: Any = None, size: int = 16) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (float32 logits (positions, V), labels (positions,)) at its answer positions."""
    from editing.model.tokenise import tokenise

    for start in range(0, len(rows.prompts), size):
        batch = tokenise(tokenizer, rows.prompts[start : start + size], rows.answers[start : start + size])
        if stats is not None:
            stats.select = batch.answer_mask
        # the output layer only where an answer is predicted (a fifth of SmolLM2's forward otherwise)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        head = model.get_output_embeddings()
        for b in range(hidden.shape[0]):
            mask = batch.answer_mask[b]
            yield head(hidden[b][mask]).float(), batch.labels[b][mask]


def reference_of(model: Any, tokenizer: Any, rows: Rows) -> Reference:
    """The unedited model's predictions on the locality rows."""
    ref = Reference([], [], [])
    for logits, _ in answer_logits(model, tokenizer, rows):
        log_probs = logits.log_softmax(-1)
        best = log_probs.max(-1)
        ref.top1.append(best.indices)
        ref.confidence.append(best.values.exp())
        ref.log_probs.append(log_probs)
    return ref


def percent(values: Sequence[float]) -> float:
    return round(100.0 * sum(values) / len(values), 2) if values else float("nan")


def evaluate(model: Any, tokenizer: Any, rows: list[Rows], reference: Reference, stats: Any = None) -> dict[str, Any]:
    """ES, GS, retention, confident retention, mean KL and, with `stats` (the routing's), the routed shares per kind."""
    out: dict[str, Any] = {}
    shares: dict[str, dict[str, float]] = {}
    for kind in rows:
        if stats is not None:
            stats.on.clear()
            stats.seen.clear()
        accuracy, agree, kl = [], [], []
        confident_hits, confident_seen = 0, 0
        for i, (logits, labels) in enumerate(answer_logits(model, tokenizer, kind, stats)):
            top1 = logits.argmax(-1)
            if kind.kind != "locality":
                accuracy.append(float((top1 == labels).float().mean()))
                continue
            same = top1 == reference.top1[i]
            agree.append(float(same.float().mean()))
            sure = reference.confidence[i] >= CONFIDENT
            confident_hits, confident_seen = confident_hits + int(same[sure].sum()), confident_seen + int(sure.sum())
            p_log = reference.log_probs[i]
            kl.append(float((p_log.exp() * (p_log - logits.log_softmax(-1))).sum(-1).mean()))
        if kind.kind == "edit":
            out["efficacy"] = percent(accuracy)
        elif kind.kind == "paraphrase":
            out["generalization"] = percent(accuracy)
        else:
            out["retention"] = percent(agree)
            out["confident_retention"] = round(100.0 * confident_hits / max(1, confident_seen), 2)
            out["confident_positions"] = confident_seen
            out["mean_kl"] = round(sum(kl) / len(kl), 4)
        if stats is not None:
            shares[kind.kind] = {layer_of(name): round(100.0 * share, 1) for name, share in stats.shares().items()}
    if shares:
        out["routed_on_percent"] = shares
    return out


def layer_of(name: str) -> str:
    """'model.layers.20.mlp.up_proj' -> '20' (the name itself when it has no layer index)."""
    found = re.search(r"\.(\d+)\.", name)
    return found.group(1) if found else name


class Sweep:
    """The model, the stream, the unedited reference and the results file, shared by the points."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        from editing.config import EditorConfig, ModelConfig
        from editing.engine.routing import base_weights
        from editing.evaluation.methods import get_method
        from editing.evaluation.runner import EvaluationPlan, evaluation_batches
        from editing.model.loading import load_model
        from editing.model.targets import default_edit_modules

        self.args = args
        self.config = EditorConfig()  # the daemon's editor settings (S = 2, preserve_edits 1)
        self.loaded = load_model(ModelConfig(), cache_dir=Path(".cache/models"))
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.names = default_edit_modules(self.loaded.model_type, self.loaded.num_layers)
        spec = f"zsre:{args.data}"
        plan = EvaluationPlan(methods=[get_method("emsedit2-mem")], eval_data=spec, eval_offset=args.offset, batches=args.batches, seed=args.seed)
        self.batches = evaluation_batches(plan)
        self.rows = stream_rows([f for batch in self.batches for f in batch])
        self.base = base_weights(self.model, self.names)
        self.reference = reference_of(self.model, self.tokenizer, self.rows[2])
        self.stem = args.output
        stream = {"data": str(args.data), "offset": args.offset, "batches": args.batches, "batch_size": 16, "seed": args.seed}
        self.report: dict[str, Any] = {
            "description": "routed edits (editing/engine/routing.py), untrained editor, daemon settings otherwise",
            "commands": [shlex.join(["nice", "-n", "10", ".venv/bin/python", "bench/route_sweep.py", *argv])],
            "stream": stream,
            "model": self.loaded.model_type,
            "edited_modules": self.names,
            "editor": self.config.model_dump(mode="json", include={"steps", "preserve_edits", "key_covariance", "edit_lr", "batch_size"}),
            "threads": args.threads,
            "points": [],
        }
        old = self.stem.with_suffix(".json")
        if old.exists() and not args.fresh:
            earlier = json.loads(old.read_text())
            if earlier.get("stream") == stream:
                command = self.report["commands"][0]
                self.report |= {k: v for k, v in earlier.items() if k != "threads"}
                self.report["commands"] = [c for c in earlier.get("commands", []) if c != command] + [command]

    def add_point(self, point: dict[str, Any]) -> None:
        """Record a point (replacing one of the same mode, keys and τ) and write every output file."""
        same = ("mode", "keys", "tau")
        self.report["points"] = [p for p in self.report["points"] if any(p.get(k) != point.get(k) for k in same)] + [point]
        print(json.dumps(point), flush=True)
        self.write()

    def write(self) -> None:
        self.stem.with_suffix(".json").write_text(json.dumps(self.report, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(markdown(self.report))
        plot(self.report, self.stem.with_suffix(".png"))

    def editor(self) -> Any:
        from editing.engine.emsedit import EMSEditor

        torch.manual_seed(self.args.seed)
        return EMSEditor(self.model, self.tokenizer, self.names, self.config)

    def routing(self, store: Any, tau: float) -> AbstractContextManager[Any]:
        from editing.engine.routing import RouteConfig, routed

        return routed(self.model, self.base, store, RouteConfig(threshold=tau))

    def evaluate(self, store: Any = None, tau: float | None = None) -> dict[str, Any]:
        """Metrics of the current model, routed at τ with `store` when both are given."""
        from editing.engine.routing import RouteConfig, RouteStats, routed

        if store is None or tau is None:
            return evaluate(self.model, self.tokenizer, self.rows, self.reference)
        stats = RouteStats()
        with routed(self.model, self.base, store, RouteConfig(threshold=tau), stats):
            return evaluate(self.model, self.tokenizer, self.rows, self.reference, stats)

    def edit_stream(self, tau: float | None) -> tuple[Any, float]:
        """Edit every batch (routed at τ, or plainly); the key store of the committed edits and the seconds.

        Plain: the store holds each edit's last-step keys (its editor state). Routed: see the module docstring.
        """
        from editing.engine.deltas import apply, master_copies
        from editing.engine.routing import KeyStore, answer_keys, state_keys

        editor, store = self.editor(), KeyStore()
        masters = master_copies(self.model, self.names)
        began = time.perf_counter()
        for k, batch in enumerate(self.batches):
            prompts, targets = [f.prompt for f in batch], [f.target_new for f in batch]
            with self.routing(store, tau) if tau is not None else nullcontext():
                if tau is not None:
                    store.add(answer_keys(self.model, self.tokenizer, self.names, prompts, targets))
                plan = editor.propose(batch, masters)
                apply(self.model, plan, masters)
                editor.adopt_state(plan)
                if tau is not None:
                    committed = answer_keys(self.model, self.tokenizer, self.names, prompts, targets)
                    store.pop()
                    store.add(committed)
            if tau is None:
                store.add(state_keys(plan.editor_state))
            print(f"batch {k + 1}/{len(self.batches)} tau={tau} {time.perf_counter() - began:.0f}s", flush=True)
        return store, time.perf_counter() - began

    def restore(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Put `weights` (module -> weight as stored; default the unedited ones) into the edited modules."""
        from editing.engine.deltas import parameter
        from editing.model.targets import resolve_modules

        with torch.no_grad():
            for name, module in resolve_modules(self.model, self.names).items():
                parameter(module).copy_((weights or self.base)[name])

    def recaptured(self, store: Any, tau: float) -> Any:
        """The edit prompts' keys taken again on the final model routed at τ with `store`."""
        from editing.engine.routing import KeyStore, answer_keys

        fresh = KeyStore()
        edits = self.rows[0]
        with self.routing(store, tau):
            fresh.add(answer_keys(self.model, self.tokenizer, self.names, edits.prompts, edits.answers))
        return fresh

    def cost(self, store: Any, tau: float, repeats: int) -> dict[str, Any]:
        """Seconds per forward of 16 locality rows, plain and routed with `store` (medians, interleaved)."""
        from editing.model.tokenise import tokenise

        loc = self.rows[2]
        batch = tokenise(self.tokenizer, loc.prompts[:16], loc.answers[:16])
        plain: list[float] = []
        routed_s: list[float] = []
        with torch.no_grad():
            for i in range(repeats + 2):
                for target, context in ((plain, nullcontext()), (routed_s, self.routing(store, tau))):
                    with context:
                        began = time.perf_counter()
                        self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                        if i >= 2:  # two warm-up rounds
                            target.append(time.perf_counter() - began)
        keys = {layer_of(n): store.count(n) for n in self.names}
        return {
            "batch": f"16 locality rows, {int(batch.attention_mask.sum())} tokens",
            "stored_keys_per_module": keys,
            "key_store_bytes": store.nbytes(),
            "key_store_bytes_per_fact": round(store.nbytes() / len(self.rows[0].prompts)),
            "plain_s": round(statistics.median(plain), 4),
            "routed_s": round(statistics.median(routed_s), 4),
            "ratio": round(statistics.median(routed_s) / statistics.median(plain), 3),
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        }


def run(args: argparse.Namespace, argv: list[str]) -> None:
    """Mode A's stream, its points at --recapture-taus (both key stores), mode B, then A's other thresholds."""
    from editing.engine.routing import base_weights

    sweep = Sweep(args, argv)
    unedited = sweep.evaluate()
    sweep.report["unedited"] = unedited
    print("unedited", json.dumps(unedited), flush=True)
    edited: dict[str, torch.Tensor] = {}
    store = None
    if "A" in args.modes:
        store, seconds = sweep.edit_stream(None)
        edited = base_weights(sweep.model, sweep.names)  # mode A's final weights, kept across mode B
        sweep.add_point({"mode": "A", "keys": "none", "tau": "off", **sweep.evaluate(), "edit_seconds": round(seconds)})
        sweep.report["cost"] = sweep.cost(store, min(args.taus_a), args.cost_repeats)
        sweep.write()
        for tau in args.recapture_taus:
            posthoc_point(sweep, store, tau, recapture=True)
    for tau in args.taus_b:
        sweep.restore()
        b_store, seconds = sweep.edit_stream(tau)
        sweep.add_point({"mode": "B", "keys": "recaptured", "tau": tau, **sweep.evaluate(b_store, tau), "edit_seconds": round(seconds)})
    sweep.restore(edited)
    for tau in [t for t in args.taus_a if t not in args.recapture_taus] if store is not None else []:
        posthoc_point(sweep, store, tau, recapture=False)
    sweep.restore()


def posthoc_point(sweep: Sweep, store: Any, tau: float, *, recapture: bool) -> None:
    """Mode A at τ with the editor's keys and, with `recapture`, with the keys recaptured on the routed model."""
    began = time.perf_counter()
    sweep.add_point({"mode": "A", "keys": "editor", "tau": tau, **sweep.evaluate(store, tau), "eval_seconds": round(time.perf_counter() - began)})
    if recapture:
        began = time.perf_counter()
        again = sweep.recaptured(store, tau)
        sweep.add_point({"mode": "A", "keys": "recaptured", "tau": tau, **sweep.evaluate(again, tau), "eval_seconds": round(time.perf_counter() - began)})


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def ordered(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By mode and key store, routing off first, then from the strictest threshold down."""
    return sorted(points, key=lambda p: (p["mode"], p["keys"] != "none", p["keys"], -(p["tau"] if p["tau"] != "off" else 2.0)))


def markdown(report: dict[str, Any]) -> str:
    s = report["stream"]
    lines = [
        "# Routed edits: efficacy and locality against the threshold τ",
        "",
        f"Generated by `bench/route_sweep.py` ({report['description']}). Stream: {s['batches']} sequential batches of "
        f"{s['batch_size']} facts after the first {s['offset']} of `{Path(s['data']).name}` (seed {s['seed']}), never the dev "
        f"file; editor {report['editor']}; modules {', '.join(report['edited_modules'])}. Every metric on the final model.",
        "",
        "Mode A: the stream edited as today, then served routed (keys: `editor` = each edit's last-step keys, "
        "`recaptured` = the edit prompts' keys taken again on the final routed model). Mode B: every batch edited on "
        "the routed model. τ = off is today's default. Retention: top-1 agreement with the unedited model on the "
        f"locality rows; confident: only where the unedited top-1 probability is >= {CONFIDENT}; KL: mean "
        "KL(unedited ‖ edited) per locality answer position, averaged per row then over rows.",
        "",
        "Commands, in the order they ran (each adds its points to the file): " + "; ".join(f"`{c}`" for c in report["commands"]) + ".",
        "",
        "| mode | keys | τ | ES | GS | retention | confident retention | mean KL | routed on: edit / paraphrase / locality (% of positions, mean over modules) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    unedited = report.get("unedited")
    if unedited:
        lines.append(f"| unedited | - | - | {unedited['efficacy']} | {unedited['generalization']} | 100 | 100 | 0 | - |")
    for p in ordered(report["points"]):
        shares = p.get("routed_on_percent", {})
        mean = " / ".join(_cell(round(statistics.mean(shares[k].values()), 1)) if shares.get(k) else "-" for k in ("edit", "paraphrase", "locality"))
        lines.append(
            f"| {p['mode']} | {p['keys']} | {p['tau']} | {p['efficacy']} | {p['generalization']} | {p['retention']} | "
            f"{p['confident_retention']} | {p['mean_kl']} | {mean if shares else '-'} |"
        )
    lines += ["", "## Share of positions routed on, per edited layer (%)", ""]
    routed_points = [p for p in ordered(report["points"]) if p.get("routed_on_percent")]
    if routed_points:
        layers = list(routed_points[0]["routed_on_percent"].get("locality", {}))
        lines += ["| mode | keys | τ | kind | " + " | ".join(layers) + " |", "|---|---|---|---|" + "---|" * len(layers)]
        for p in routed_points:
            for kind, per_layer in p["routed_on_percent"].items():
                lines.append(f"| {p['mode']} | {p['keys']} | {p['tau']} | {kind} | " + " | ".join(_cell(per_layer.get(x)) for x in layers) + " |")
    cost = report.get("cost")
    if cost:
        lines += [
            "",
            "## Forward cost",
            "",
            f"{cost['batch']}, {cost['threads']} thread(s), median of {cost['repeats']}: plain {cost['plain_s']} s, routed "
            f"{cost['routed_s']} s, **ratio {cost['ratio']}**, with {cost['stored_keys_per_module']} stored keys per layer "
            f"({cost['key_store_bytes'] / 1e6:.1f} MB of float32 keys, {cost['key_store_bytes_per_fact'] / 1e3:.1f} KB per fact).",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Efficacy and generalisation against retention, one point per τ and series; routing off marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    series = sorted({(p["mode"], p["keys"]) for p in report["points"] if p["tau"] != "off"})
    colours = plt.get_cmap("tab10")
    for ax, metric, title in ((axes[0], "efficacy", "efficacy (ES)"), (axes[1], "generalization", "generalisation (GS)")):
        for index, (mode, keys) in enumerate(series):
            points = sorted((p for p in report["points"] if (p["mode"], p["keys"]) == (mode, keys) and p["tau"] != "off"), key=lambda p: -p["tau"])
            xs, ys = [p["retention"] for p in points], [p[metric] for p in points]
            label = {"A": "post-hoc routing", "B": "edited on the routed model"}[mode] + f", {keys} keys"
            ax.plot(xs, ys, marker="o", color=colours(index), label=label)
            for p in points:
                ax.annotate(f"τ={p['tau']}", (p["retention"], p[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for p in report["points"]:
            if p["tau"] == "off":
                ax.plot([p["retention"]], [p[metric]], marker="*", markersize=14, color="black", linestyle="none", label="today's default (routing off)")
        # the targets on ZsRE (ES >= 90, GS >= 80, retention >= 95)
        ax.axvline(95.0, color="grey", linestyle=":", linewidth=1)
        ax.axhline({"efficacy": 90.0, "generalization": 80.0}[metric], color="grey", linestyle=":", linewidth=1, label="target (issue #20)")
        ax.set_xlabel("retention (% top-1 agreement with the unedited model)")
        ax.set_ylabel(f"{title}, %")
        ax.set_title(f"{title} against retention")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    s = report["stream"]
    unedited = report.get("unedited", {})
    fig.suptitle(
        f"Routed edits, {s['batches']}×{s['batch_size']} sequential ZsRE-train edits, final model "
        f"(unedited: ES {unedited.get('efficacy')}, GS {unedited.get('generalization')}, retention 100)"
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:  # a palette image: a fraction of the bytes, the same look
        image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def taus(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the ZsRE training file")
    parser.add_argument("--offset", type=int, default=486, help="the stream starts after this many facts")
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="A", help="'A' runs the post-hoc points ('' skips them; mode B runs for every --taus-b)")
    parser.add_argument("--taus-a", type=taus, default=taus("0.95,0.9,0.85,0.8,0.7,0.6"), help="post-hoc thresholds")
    parser.add_argument("--taus-b", type=taus, default=taus("0.9,0.8"), help="thresholds to edit the stream routed at")
    parser.add_argument(
        "--recapture-taus", type=taus, default=taus("0.9"), help="post-hoc thresholds also run with recaptured keys (run first)"
    )
    parser.add_argument("--cost-repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=RESULTS / "route_sweep", help="path stem of the .json/.md/.png")
    parser.add_argument("--fresh", action="store_true", help="ignore points of an earlier run")
    parser.add_argument("--render", action="store_true", help="only write the .md and .png again from the .json")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.output.with_suffix(".json").read_text())
        args.output.with_suffix(".md").write_text(markdown(report))
        plot(report, args.output.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    run(args, list(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
