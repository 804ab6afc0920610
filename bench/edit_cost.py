"""Seconds per edit batch (16 facts, S = 2, SmolLM2) with its breakdown, against the bare LM cost.

The bare cost is S forward + backward passes of the LM on the same edit batch with gradients on the
edited weights only (what any gradient-based editor must pay). The edit is timed step by step:
LM forward/backward with tracing, hypernetwork (normaliser update and pseudo-pairs), ridge solve,
apply (writing W + ΔW), and the final restore that `propose` does. Also reported: hypernetwork
parameters and bytes, and the peak memory of an edit batch (CUDA peak allocation on a GPU, growth of
the process's peak RSS on CPU).

    .venv/bin/python bench/edit_cost.py --repeats 5

Writes bench/results/edit_cost.json and .md. Timings on a shared CPU are noisy; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from editing.config import EditorConfig, ModelConfig
from editing.data import load_zsre
from editing.engine.deltas import apply, master_copies, restore, snapshot
from editing.engine.emsedit import EMSEditor, answer_loss, lm_logits
from editing.engine.solve import ridge_solve
from editing.model.loading import load_model
from editing.model.targets import default_edit_modules

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "zsre" / "zsre_train.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    began = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - began


def bare_cost(editor: EMSEditor, batch: Any, steps: int) -> float:
    """S plain forward + backward passes with gradients on the edited weights only."""
    device = editor.device
    weights = [m.weight for m in editor.modules.values()]
    for w in weights:
        w.requires_grad_(True)

    def passes() -> None:
        for _ in range(steps):
            answer_loss(lm_logits(editor.model, batch), batch.labels.to(device)).backward()
            for w in weights:
                w.grad = None

    try:
        return _timed(device, passes)[1]
    finally:
        for w in weights:
            w.requires_grad_(False)


def timed_edit(editor: EMSEditor, batch: Any) -> dict[str, float]:
    """One S-step edit as `propose` runs it, with each part timed."""
    device = editor.device
    parts = dict.fromkeys(["lm_forward_backward", "hypernetwork", "solve", "apply", "restore"], 0.0)
    masters = master_copies(editor.model, editor.module_names)
    saved = snapshot(editor.model, editor.module_names)
    for step in range(1, editor.steps + 1):
        (captures, _), seconds = _timed(device, lambda: editor.capture(batch))
        parts["lm_forward_backward"] += seconds

        def pseudo(step: int = step, captures: Any = captures) -> dict[str, Any]:
            editor.update_normalisers(step, captures)
            out = {}
            with torch.no_grad():
                for name, (keys, grads) in captures.items():
                    net, idx = editor.nets.net(step, name)
                    out[name] = (keys, net.values(keys, grads, idx), net.ridge(idx))
            return out

        values, seconds = _timed(device, pseudo)
        parts["hypernetwork"] += seconds
        with torch.no_grad():
            deltas, seconds = _timed(device, lambda v=values: {n: ridge_solve(k, x, lam) for n, (k, x, lam) in v.items()})
        parts["solve"] += seconds
        parts["apply"] += _timed(device, lambda d=deltas: apply(editor.model, d, masters))[1]
    parts["restore"] = _timed(device, lambda: restore(editor.model, saved))[1]
    return parts


def peak_memory(editor: EMSEditor, examples: Sequence[Any]) -> dict[str, float]:
    """Peak memory of one `propose` (CUDA: peak allocated; CPU: growth of the process's peak RSS)."""
    if editor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(editor.device)
        base = torch.cuda.memory_allocated(editor.device)
        editor.propose(examples)
        return {"peak_bytes_above_model": torch.cuda.max_memory_allocated(editor.device) - base}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    editor.propose(examples)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss_bytes": after, "peak_rss_growth_bytes": after - before}


def hypernet_size(editor: EMSEditor) -> dict[str, int]:
    params = sum(p.numel() for p in editor.nets.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in editor.nets.state_dict().values())
    return {"hypernet_parameters": params, "hypernet_bytes": nbytes}


def run(repeats: int, rank: int, batch_size: int, steps: int, dtype: str) -> dict[str, Any]:
    loaded = load_model(ModelConfig(dtype=dtype))  # type: ignore[arg-type]
    names = default_edit_modules(loaded.model_type, loaded.num_layers)
    editor = EMSEditor(loaded.model, loaded.tokenizer, names, EditorConfig(rank=rank, steps=steps, lm_batch_size=batch_size))
    examples = load_zsre(DATA, limit=batch_size * (repeats + 1))
    bare, edits, propose_s = [], [], []
    breakdowns: list[dict[str, float]] = []
    for i in range(repeats + 1):  # the first round warms up
        chunk = examples[i * batch_size : (i + 1) * batch_size]
        batch = editor.tokenise(chunk)
        b = bare_cost(editor, batch, steps)
        parts = timed_edit(editor, batch)
        _, p = _timed(editor.device, lambda c=chunk: editor.propose(c))
        if i:
            bare.append(b)
            breakdowns.append(parts)
            edits.append(sum(parts.values()))
            propose_s.append(p)
    mean_parts = {k: statistics.mean(b[k] for b in breakdowns) for k in breakdowns[0]}
    bare_s, edit_s = statistics.median(bare), statistics.median(propose_s)
    return {
        "model": "SmolLM2-135M-Instruct",
        "dtype": dtype,
        "device": str(editor.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "facts_per_batch": batch_size,
        "steps": steps,
        "rank": rank,
        "modules": len(names),
        "repeats": repeats,
        "bare_seconds": bare_s,
        "edit_seconds": edit_s,
        "ratio": edit_s / bare_s,
        "breakdown_seconds": mean_parts,
        "breakdown_total_seconds": statistics.median(edits),
        "bare_seconds_all": bare,
        "edit_seconds_all": propose_s,
        **hypernet_size(editor),
        **peak_memory(editor, examples[:batch_size]),
    }


def markdown(result: dict[str, Any]) -> str:
    parts = "\n".join(f"| {k} | {v:.3f} |" for k, v in result["breakdown_seconds"].items())
    return f"""# Edit cost (generated by `bench/edit_cost.py`)

{result['model']}, {result['dtype']} on {result['device']} ({result['torch_threads']} torch threads, load average
{', '.join(f'{x:.1f}' for x in result['load_average'])} during the run), {result['facts_per_batch']} ZsRE facts per batch,
S = {result['steps']}, rank {result['rank']}, {result['modules']} edited modules, median of {result['repeats']} batches.

| measure | seconds |
|---|---|
| bare: S forward + backward passes | {result['bare_seconds']:.3f} |
| edit: `propose` (S steps, restore included) | {result['edit_seconds']:.3f} |
| **ratio** | **{result['ratio']:.2f}** |

Breakdown of one edit (mean):

| part | seconds |
|---|---|
{parts}

Hypernetworks: {result['hypernet_parameters']:,} parameters, {result['hypernet_bytes'] / 2**20:.1f} MiB (normaliser buffers included).
Peak memory: {json.dumps({k: v for k, v in result.items() if k.startswith('peak')})}.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=EditorConfig().rank)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    result = run(args.repeats, args.rank, args.batch_size, args.steps, args.dtype)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edit_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "edit_cost.md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("bare_seconds", "edit_seconds", "ratio", "breakdown_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
