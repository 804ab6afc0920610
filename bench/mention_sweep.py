"""Mention-routed edits (editing/engine/mentions.py) on a *training* file: the frontier against today's default.

The stream is that of bench/route_sweep.py: `--batches` sequential batches of 16 facts after the first
`--offset` facts of the training file (never a dev/val file), shuffled with the seed; an *untrained* editor
with the daemon's settings otherwise. The normaliser and the general-text bank of the router come from the
first `--offset` facts (the editor's training part of the file), never from the stream.

Each point edits the whole stream on the routed model (every batch's mention keys are stored before it is
edited, so its own edit steps see it routed on) at one threshold τ and one step-size multiplier (η × m: with
locality handled by the router, a stronger edit may buy generalisation), then measures on the final model:
ES, GS, retention, confident retention, mean KL (as bench/route_sweep.py), the share of edit, paraphrase and
locality answer positions routed on, and for CounterFact the neighbourhood score. "off" is today's default.

    nice -n 10 .venv/bin/python -m bench.mention_sweep --data zsre --taus 0.75 --lr-scales 1 > /tmp/work/ms.log 2>&1

Writes bench/results/mention_sweep_<data>.{json,md,png} after every point; points already in the JSON of the
same stream are kept unless recomputed (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.route_sweep import Rows, evaluate, reference_of, stream_rows

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).parents[1].parent / "shared" / "data"
DATA = {
    "zsre": ("zsre", SHARED / "zsre" / "zsre_train.json", 486),
    "counterfact": ("counterfact", SHARED / "counterfact" / "counterfact_train.json", 2000),
}


class MentionSweep:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        from editing.config import ModelConfig
        from editing.data import load_examples
        from editing.engine.key_covariance import reference_texts
        from editing.engine.mentions import MentionSettings, build_router
        from editing.engine.routing import base_weights
        from editing.evaluation.methods import get_method
        from editing.evaluation.runner import EvaluationPlan, evaluation_batches
        from editing.model.loading import load_model
        from editing.model.targets import default_edit_modules

        self.args = args
        kind, path, offset = DATA[args.data]
        self.loaded = load_model(ModelConfig(), cache_dir=Path(".cache/models"))
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.names = default_edit_modules(self.loaded.model_type, self.loaded.num_layers)
        plan = EvaluationPlan(methods=[get_method("emsedit2-mem")], eval_data=f"{kind}:{path}", eval_offset=offset, batches=args.batches, seed=args.seed)
        self.batches = evaluation_batches(plan)
        self.rows = stream_rows([f for batch in self.batches for f in batch])
        self.base = base_weights(self.model, self.names)
        self.reference = reference_of(self.model, self.tokenizer, self.rows[2])
        self.neighbour_rows = self._neighbour_rows() if kind == "counterfact" else None
        general = reference_texts(load_examples(f"{kind}:{path}")[:offset], limit=args.bank_texts)
        settings = MentionSettings(distinct=args.distinct, blocks_before=args.blocks_before, bank_texts=args.bank_texts)
        self.router = build_router(self.model, self.tokenizer, self.names, general, settings)
        self.block = self.router.config.block
        self.stem = args.output or RESULTS / f"mention_sweep_{args.data}"
        stream = {"data": str(path), "offset": offset, "batches": args.batches, "batch_size": 16, "seed": args.seed}
        self.report: dict[str, Any] = {
            "description": "mention-routed edits (editing/engine/mentions.py), untrained editor, daemon settings otherwise",
            "commands": [shlex.join(["nice", "-n", "10", ".venv/bin/python", "-m", "bench.mention_sweep", *argv])],
            "stream": stream,
            "edited_modules": self.names,
            "decision_block": self.block,
            "bank_tokens": int(self.router.bank.shape[0]),
            "distinct": args.distinct,
            "points": [],
        }
        old = self.stem.with_suffix(".json")
        if old.exists() and not args.fresh:
            earlier = json.loads(old.read_text())
            if earlier.get("stream") == stream:
                command = self.report["commands"][0]
                self.report |= {k: v for k, v in earlier.items() if k not in ("commands",)}
                self.report["commands"] = [c for c in earlier.get("commands", []) if c != command] + [command]

    def _neighbour_rows(self) -> tuple[Rows, Rows]:
        """CounterFact's neighbourhood prompts forced on the true answer and on the new target."""
        facts = [f for batch in self.batches for f in batch]
        prompts = [p for f in facts for p, _ in f.locality]
        true = [a for f in facts for _, a in f.locality]
        new = [f.target_new for f in facts for _ in f.locality]
        return Rows("true", prompts, true), Rows("new", prompts, new)

    def neighbourhood_score(self) -> float:
        """Share of neighbourhood prompts where P(true answer) > P(new target) (summed token log-probs)."""
        from bench.route_sweep import answer_logits

        assert self.neighbour_rows is not None
        true_rows, new_rows = self.neighbour_rows
        scores = []
        for (lt, yt), (ln, yn) in zip(answer_logits(self.model, self.tokenizer, true_rows), answer_logits(self.model, self.tokenizer, new_rows), strict=True):
            pt = float(lt.log_softmax(-1).gather(-1, yt.unsqueeze(-1)).sum())
            pn = float(ln.log_softmax(-1).gather(-1, yn.unsqueeze(-1)).sum())
            scores.append(pt > pn)
        return round(100.0 * sum(scores) / len(scores), 2)

    def add_point(self, point: dict[str, Any]) -> None:
        same = ("tau", "lr_scale")
        path = self.stem.with_suffix(".json")
        if path.exists():  # points another run of the same stream wrote meanwhile are kept
            on_disk = json.loads(path.read_text())
            if on_disk.get("stream") == self.report["stream"]:
                mine = {tuple(p.get(k) for k in same) for p in self.report["points"]}
                self.report["points"] += [p for p in on_disk["points"] if tuple(p.get(k) for k in same) not in mine]
                self.report["commands"] += [c for c in on_disk.get("commands", []) if c not in self.report["commands"]]
        self.report["points"] = [p for p in self.report["points"] if any(p.get(k) != point.get(k) for k in same)] + [point]
        print(json.dumps(point), flush=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.report, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(markdown(self.report))
        plot(self.report, self.stem.with_suffix(".png"))

    def restore(self) -> None:
        from editing.engine.deltas import parameter
        from editing.model.targets import resolve_modules

        with torch.no_grad():
            for name, module in resolve_modules(self.model, self.names).items():
                parameter(module).copy_(self.base[name])

    def run_point(self, tau: float | None, lr_scale: float) -> None:
        from contextlib import nullcontext

        from editing.config import EditorConfig
        from editing.engine.deltas import apply, master_copies
        from editing.engine.emsedit import EMSEditor
        from editing.engine.mentions import MentionConfig, MentionStats, Router, mention_keys, mention_routed

        self.restore()
        editor_config = EditorConfig()
        editor_config = editor_config.model_copy(update={"edit_lr": editor_config.edit_lr * lr_scale})
        torch.manual_seed(self.args.seed)
        editor = EMSEditor(self.model, self.tokenizer, self.names, editor_config)
        config = MentionConfig(self.block, tau if tau is not None else 2.0, self.router.config.distinct)
        router = Router(config, self.router.normaliser, self.router.bank)
        masters = master_copies(self.model, self.names)
        began = time.perf_counter()
        for k, batch in enumerate(self.batches):
            if tau is not None:
                router.keys.add(mention_keys(self.model, self.tokenizer, router, [f.prompt for f in batch], [f.subject for f in batch]))
            with mention_routed(self.model, self.base, router) if tau is not None else nullcontext():
                plan = editor.propose(batch, masters)
                apply(self.model, plan, masters)
                editor.adopt_state(plan)
            print(f"batch {k + 1}/{len(self.batches)} tau={tau} lr×{lr_scale} {time.perf_counter() - began:.0f}s", flush=True)
        seconds = time.perf_counter() - began
        point: dict[str, Any] = {"tau": "off" if tau is None else tau, "lr_scale": lr_scale, "edit_seconds": round(seconds)}
        if tau is None:
            point |= evaluate(self.model, self.tokenizer, self.rows, self.reference)
            if self.neighbour_rows is not None:
                point["neighbourhood_score"] = self.neighbourhood_score()
        else:
            shares = {}
            with mention_routed(self.model, self.base, router):
                point |= evaluate(self.model, self.tokenizer, self.rows, self.reference)
                if self.neighbour_rows is not None:
                    point["neighbourhood_score"] = self.neighbourhood_score()
            from editing.model.tokenise import tokenise

            for rows in self.rows:
                stats = MentionStats()
                with mention_routed(self.model, self.base, router, stats), torch.no_grad():
                    for start in range(0, len(rows.prompts), 16):
                        tokens = tokenise(self.tokenizer, rows.prompts[start : start + 16], rows.answers[start : start + 16])
                        stats.select = tokens.answer_mask
                        self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
                shares[rows.kind] = round(100.0 * stats.on / max(1, stats.seen), 1)
            point["routed_on_percent"] = shares
            point["keys"] = router.keys.count()
        self.add_point(point)


def markdown(report: dict[str, Any]) -> str:
    s = report["stream"]
    lines = [
        "# Mention-routed edits: the frontier on a training split",
        "",
        f"Generated by `bench/mention_sweep.py` ({report['description']}). Stream: {s['batches']} sequential batches of "
        f"{s['batch_size']} facts after the first {s['offset']} of `{Path(s['data']).name}` (seed {s['seed']}), never a dev "
        f"file; decision block {report['decision_block']}, γ {report.get('distinct', 0.6)}; router statistics from {report['bank_tokens']} tokens of the "
        "file's first part. Every metric on the final model. τ = off is today's default (no routing).",
        "",
        "Commands, in the order they ran: " + "; ".join(f"`{c}`" for c in report["commands"]) + ".",
        "",
        "| τ | η × | ES | GS | retention | confident retention | mean KL | neighbourhood | routed on: edit / paraphrase / locality (% answer positions) | keys |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(report["points"], key=lambda p: (p["tau"] != "off", str(p["tau"]), p["lr_scale"])):
        shares = p.get("routed_on_percent")
        on = " / ".join(str(shares[k]) for k in ("edit", "paraphrase", "locality")) if shares else "-"
        lines.append(
            f"| {p['tau']} | {p['lr_scale']} | {p['efficacy']} | {p['generalization']} | {p['retention']} | "
            f"{p['confident_retention']} | {p['mean_kl']} | {p.get('neighbourhood_score', '-')} | {on} | {p.get('keys', '-')} |"
        )
    if not any(p["tau"] == "off" for p in report["points"]):
        lines += ["", "No `off` point in this file: the plot takes today's default from bench/results/route_sweep.json when "
                  "that file measured the same stream (mode A, routing off)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """ES and GS against retention: one line per step-size multiplier across τ, today's default as a star, and
    (ZsRE) the answer-position routing of bench/results/route_sweep.json on the same stream for comparison."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    points = report["points"]
    scales = sorted({p["lr_scale"] for p in points if p["tau"] != "off"})
    colours = plt.get_cmap("tab10")
    earlier = RESULTS / "route_sweep.json"
    answer_points: list[dict[str, Any]] = []
    if earlier.exists():
        old = json.loads(earlier.read_text())
        same = {k: old["stream"].get(k) for k in ("offset", "batches", "seed")} == {k: report["stream"][k] for k in ("offset", "batches", "seed")}
        if same and Path(old["stream"]["data"]).name == Path(report["stream"]["data"]).name:
            answer_points = sorted((p for p in old["points"] if p["mode"] == "B"), key=lambda p: -p["tau"])
            if not any(p["tau"] == "off" for p in points):  # today's default on the same stream, measured there
                points = points + [{**p, "lr_scale": 1.0} for p in old["points"] if p["tau"] == "off"]
    for ax, metric, title in ((axes[0], "efficacy", "efficacy (ES)"), (axes[1], "generalization", "generalisation (GS)")):
        for index, scale in enumerate(scales):
            series = sorted((p for p in points if p["tau"] != "off" and p["lr_scale"] == scale), key=lambda p: -p["tau"])
            ax.plot([p["retention"] for p in series], [p[metric] for p in series], marker="o", color=colours(index),
                    label=f"mention routing, η × {scale}")
            for p in series:
                ax.annotate(f"τ={p['tau']}", (p["retention"], p[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if answer_points:
            ax.plot([p["retention"] for p in answer_points], [p[metric] for p in answer_points], marker="x", color="grey",
                    linestyle="--", label="answer-position routing (route_sweep, mode B)")
        for p in points:
            if p["tau"] == "off":
                ax.plot([p["retention"]], [p[metric]], marker="*", markersize=14, color="black", linestyle="none",
                        label=f"today's default (no routing), η × {p['lr_scale']}")
        ax.axvline(95.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("retention (% top-1 agreement with the unedited model)")
        ax.set_ylabel(f"{title}, %")
        ax.set_title(f"{title} against retention")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    s = report["stream"]
    fig.suptitle(f"Mention-routed edits, {s['batches']}×{s['batch_size']} sequential edits from {Path(s['data']).name}, final model")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="zsre")
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks-before", type=int, default=2, help="decision block: this many before the first edited one")
    parser.add_argument("--distinct", type=float, default=0.7, help="γ: bank cosine below which a prompt token is a key")
    parser.add_argument("--bank-texts", type=int, default=1000)
    parser.add_argument("--taus", default="0.75", help="thresholds; 'off' for today's default")
    parser.add_argument("--lr-scales", type=floats, default=floats("1"))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--render", action="store_true", help="only write the .md and .png again from the .json")
    args = parser.parse_args(argv)
    if args.render:
        stem = args.output or RESULTS / f"mention_sweep_{args.data}"
        report = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(markdown(report))
        plot(report, stem.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    sweep = MentionSweep(args, list(argv if argv is not None else sys.argv[1:]))
    for tau_text in args.taus.split(","):
        tau = None if tau_text.strip() == "off" else float(tau_text)
        for scale in args.lr_scales:
            sweep.run_point(tau, scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
