"""The reference code's quirks, one at a time, on a tiny random Llama (CPU, minutes): which default measures best.

Protocol: a tiny Llama (hidden 64, 2 layers, down_proj of both layers edited) with the SmolLM2 tokenizer;
synthetic counterfactual facts (`editing.engine.synthetic`); train on `--train` facts in batches of 8, then edit
`--stream` held-out batches of 8 sequentially, keeping every edit, and score them at the end: ES, GS
(teacher-forced token accuracy) and retention (top-1 agreement with the unedited model on the unrelated
prompts). Each variant flips one option of the reference configuration.

A random tiny model is not SmolLM2: the numbers rank the options, they do not predict SmolLM2 quality.

    .venv/bin/python bench/quirks.py

Writes bench/results/quirks.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from editing.config import EditorConfig
from editing.engine.deltas import master_copies, restore, snapshot
from editing.engine.emsedit import EMSEditor
from editing.engine.synthetic import synthetic_examples
from editing.engine.training import TrainingOptions, meta_train
from editing.model.edit_metrics import evaluate_examples
from editing.model.loading import default_gguf_path

RESULTS = Path(__file__).parent / "results"
MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]

REFERENCE = TrainingOptions(
    batch_size=8, epochs=3, meta_lr=1e-2, l2_coef=0.01, single_adam_step=True, squared_l2_coef=True,
    l2_on_drift=True, duplicate_params=True, revert_between_steps=True,
)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (mode, training option changes, editor option changes)
    "seq reference (all quirks)": ("sequential", {}, {}),
    "seq adam step per batch": ("sequential", {"single_adam_step": False}, {}),
    "seq adam per batch, l2 not squared": ("sequential", {"single_adam_step": False, "squared_l2_coef": False}, {}),
    "seq adam per batch, l2 on batch delta": ("sequential", {"single_adam_step": False, "l2_on_drift": False}, {}),
    "seq adam per batch, frozen normaliser at edit": ("sequential", {"single_adam_step": False}, {"freeze_normaliser": True}),
    "batch reference (all quirks)": ("batch", {}, {}),
    "batch no duplicate params": ("batch", {"duplicate_params": False}, {}),
    "batch no revert between steps": ("batch", {"revert_between_steps": False}, {}),
    "batch frozen normaliser at edit": ("batch", {}, {"freeze_normaliser": True}),
}


def _model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def run_variant(
    name: str, tokenizer: Any, facts: list[Any], n_train: int, n_stream: int, l2_coef: float
) -> dict[str, Any]:
    mode, training, editing = VARIANTS[name]
    model = _model(len(tokenizer))
    torch.manual_seed(0)
    config = EditorConfig(rank=8, n_blocks=2, edit_lr=1e-2, mode=mode, lm_batch_size=8, **editing)  # type: ignore[arg-type]
    editor = EMSEditor(model, tokenizer, MODULES, config)
    options = replace(REFERENCE, n_batches=n_train // 8, **{"l2_coef": l2_coef, **training})
    report = meta_train(editor, facts[:n_train], options)
    held = facts[n_train : n_train + 8 * n_stream]
    base = evaluate_examples(model, tokenizer, held)
    saved = snapshot(model, MODULES)
    masters = master_copies(model, MODULES)
    from editing.engine.deltas import apply

    for i in range(0, len(held), 8):
        plan = editor.propose(held[i : i + 8], masters)
        apply(model, plan, masters)
        editor.adopt_state(plan)
    after = evaluate_examples(model, tokenizer, held, reference=base.reference)
    restore(model, saved)
    return {"variant": name, "mode": mode, "options": asdict(options), "editor": editing, **after.summary(),
            "optimiser_steps": report.optimiser_steps}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--stream", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--l2-coef", type=float, default=REFERENCE.l2_coef, help="EMSEdit's 0.5 stops every edit here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    facts = synthetic_examples(args.train + 8 * args.stream, seed=0)
    rows = []
    for name in VARIANTS:
        rows.append(run_variant(name, tokenizer, facts, args.train, args.stream, args.l2_coef))
        print(json.dumps({k: rows[-1][k] for k in ("variant", "efficacy", "generalisation", "retention")}), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quirks.json").write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    lines = [
        "# Reference quirks on a tiny random Llama (generated by `bench/quirks.py`)",
        "",
        f"{args.train} synthetic training facts (batches of 8, 3 epochs, meta_lr 1e-2, L2 coefficient {args.l2_coef}),",
        f"{args.stream} held-out batches",
        "of 8 edited sequentially; ES/GS: teacher-forced token accuracy ×100; retention: top-1 agreement with the",
        "unedited model on unrelated prompts ×100. A random tiny model ranks options; it does not predict SmolLM2.",
        "",
        "| variant | ES | GS | retention | optimiser steps |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {100 * r['efficacy']:.1f} | {100 * r['generalisation']:.1f} | "
            f"{100 * r['retention']:.1f} | {r['optimiser_steps']} |"
        )
    (RESULTS / "quirks.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
