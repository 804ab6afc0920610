"""Serving speed: the daemon's streaming /v1/chat/completions against transformers' own `generate`, in one run.

    .venv/bin/python -m bench.serving [--prompts 8] [--max-tokens 32] [--concurrency 8] [--rounds 2]

Starts `python -m daemon` (the real default model unless `--model-source`, editing off, a fresh state
directory, an ephemeral port) and, in this process, loads the same model as the daemon loads it. For
the same chat prompts (the model's chat template), greedy decoding and the same `max_tokens`, it
measures:

- the daemon: streaming chat completions through the official `openai` client, one stream at a time
  and `--concurrency` streams at once; time to first token = from sending the request to the first
  chunk that carries text; tokens = the usage the daemon reports (`stream_options.include_usage`);
- transformers: `model.generate(do_sample=False, max_new_tokens=...)` with a streamer that stamps the
  first generated token; one at a time, and `--concurrency` calls at once in threads (as the daemon
  serves concurrent requests: one generation per worker thread, no batching).

Tokens per second = all completion tokens / the time spent generating them (single stream: the sum
of the requests' times; concurrent: the wall time of the condition). The ratios are daemon over
transformers for tokens/s and transformers over daemon for time to first token, so that 1 means "as
fast" and the target is >= 0.9 for both. Load from other processes on the machine should fall on
both sides alike: single-stream requests run in pairs (each prompt on both sides back to back, the
order alternating), the concurrent conditions alternate their order by round, and medians of the
rounds are reported. Because wall time on a shared machine still depends on what else runs, each
condition is also counted in tokens per CPU second of the serving process (the daemon's process,
read from /proc; this process for transformers), which that load does not change. Each side gets a
warm-up request first. The greedy texts of both sides are
compared too (they should be the same tokens: same weights, same argmax).

Writes `<output>/serving.json` and `serving.md` (default bench/results) with the command, the machine
and the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / ".cache" / "models"
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe the water cycle in a few paragraphs.",
    "What are the main differences between cats and dogs as pets?",
    "Give me a recipe for a simple tomato soup, step by step.",
    "Why is the sky blue? Explain it simply.",
    "Write a letter to a friend about a trip to the mountains.",
    "List some tips for learning a new language and explain each one.",
    "Tell me about the history of the printing press.",
    "How do plants make their food? Describe photosynthesis.",
    "Describe a busy market on a Saturday morning.",
    "What should I pack for a week-long camping trip, and why?",
)
TARGET = 0.9


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help=f"prompts per condition (at most {len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--concurrency", type=int, default=8, help="streams at once in the concurrent condition")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each condition")
    parser.add_argument("--model-source", default="default", help="[model] source (default: the default model)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where serving.json and serving.md go")
    parser.add_argument("--cache", type=Path, default=CACHE, help="the de-quantised model cache")
    parser.add_argument(
        "--daemon-env", action="append", default=[], metavar="KED_X=VALUE", help="more settings for the daemon (repeatable)"
    )
    args = parser.parse_args(argv)
    for item in args.daemon_env:
        if not item.startswith("KED_") or "=" not in item:
            parser.error(f"--daemon-env: expected KED_NAME=VALUE, got {item!r}")
    if not 1 <= args.prompts <= len(PROMPTS) or args.max_tokens < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error(f"--prompts must be 1..{len(PROMPTS)}; --max-tokens, --concurrency and --rounds >= 1")
    return args


# --- the daemon ------------------------------------------------------------------------------------


class Daemon:
    """`python -m daemon` on a fresh state directory, editing off; `url` once it is ready."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
        env |= {
            "PYTHONPATH": str(ROOT),
            "KED_MODEL__SOURCE": args.model_source,
            "KED_MODEL__DEVICE": "cpu",
            "KED_MODEL__CACHE_DIR": str(args.cache),
            "KED_API__PORT": "0",
            "KED_API__MAX_NEW_TOKENS": str(max(128, args.max_tokens)),
            "KED_API__RATE_LIMIT_PER_SECOND": "1000",
            "KED_API__RATE_LIMIT_BURST": "1000",
            "KED_EDIT_LOOP__TRAIN_IF_MISSING": "false",
            "KED_LOGGING__FORMAT": "json",
        }
        env |= dict(item.split("=", 1) for item in args.daemon_env)
        self.log_path = work / "daemon.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--state-dir", str(work / "state")],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = self._wait_ready()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("event") == "ready":
                    return str(record["api"])
        raise RuntimeError(f"the daemon ended before it was ready; see {self.log_path}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the daemon process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- one request on each side -----------------------------------------------------------------------


def daemon_request(client: Any, model_id: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: seconds to the first text, total seconds, completion tokens, text."""
    began = time.perf_counter()
    first = None
    pieces: list[str] = []
    tokens = 0
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter() - began
                pieces.append(choice.delta.content)
    total = time.perf_counter() - began
    return {"ttft_s": first if first is not None else total, "seconds": total, "tokens": tokens, "text": "".join(pieces)}


class FirstTokenStreamer:
    """A transformers streamer that stamps the first generated token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.first: float | None = None
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2 and self.first is None:
            self.first = time.perf_counter() - self.began

    def end(self) -> None:
        pass


def transformers_request(loaded: Any, ends: list[int], prompt: str, max_tokens: int) -> dict[str, Any]:
    """One `generate` call, greedy, on the chat-templated prompt; the same figures as `daemon_request`."""
    import torch

    from daemon.generation import chat_prompt

    ids = chat_prompt(loaded.tokenizer, [("user", prompt)])
    streamer = FirstTokenStreamer()
    with torch.no_grad():
        output = loaded.model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=ends,
            pad_token_id=loaded.tokenizer.pad_token_id,
            streamer=streamer,
        )
    total = time.perf_counter() - streamer.began
    new = [int(t) for t in output[0, len(ids) :]]
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    return {"ttft_s": streamer.first if streamer.first is not None else total, "seconds": total, "tokens": len(new), "text": text}


# --- conditions ------------------------------------------------------------------------------------


Side = tuple[Callable[[str], dict[str, Any]], Callable[[], float]]  # (one request, CPU seconds of its process)


def run_condition(side: Side, prompts: Sequence[str], concurrency: int) -> dict[str, Any]:
    """All `prompts` through the side's request, `concurrency` at a time; aggregate tokens/s and median TTFT."""
    request, cpu = side
    began, cpu_began = time.perf_counter(), cpu()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(request, prompts))
    return _summary(results, time.perf_counter() - began, cpu() - cpu_began)


def _summary(results: Sequence[dict[str, Any]], wall: float, cpu_s: float) -> dict[str, Any]:
    """Throughput, time to first token and the texts of one side's requests, taking `wall` and `cpu_s` seconds."""
    tokens = sum(r["tokens"] for r in results)
    return {
        "wall_s": wall,
        "cpu_s": cpu_s,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "tokens_per_cpu_s": tokens / cpu_s if cpu_s else 0.0,
        "ttft_median_s": statistics.median(r["ttft_s"] for r in results),
        "ttft_max_s": max(r["ttft_s"] for r in results),
        "texts": [r["text"] for r in results],
        "token_counts": [r["tokens"] for r in results],
    }


def run_paired(sides: dict[str, Side], order: list[str], prompts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One stream at a time, each prompt on both sides back to back (the order alternating by prompt).

    Pairing puts both sides of a comparison under the same load from whatever else runs on the machine.
    """
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    # Requests run on a worker thread, as a server runs them (the daemon's run in uvicorn's). On the
    # 2-core machine of 2026-12, under load from other processes, `generate` called on the main thread
    # burned about five times the CPU time per token of the same call on a worker thread (2.0 against
    # 11.3 tokens per CPU second), which measured the thread, not transformers.
    with ThreadPoolExecutor(max_workers=1) as worker:
        for index, prompt in enumerate(prompts):
            for side in order if index % 2 == 0 else list(reversed(order)):
                request, cpu = sides[side]
                cpu_began = cpu()
                result = worker.submit(request, prompt).result()
                results[side].append(result | {"cpu_s": cpu() - cpu_began})
    return {
        side: _summary(done, sum(r["seconds"] for r in done), sum(r["cpu_s"] for r in done))
        for side, done in results.items()
    }


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rounds))


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import openai

    from daemon.bootstrap import start_logging
    from daemon.generation import end_of_sequence_ids
    from editing.config import ModelConfig
    from editing.model.loading import load_model

    start_logging()
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request would drown the figures
        logging.getLogger(noisy).setLevel(logging.WARNING)
    prompts = list(PROMPTS[: args.prompts])
    work = Path(tempfile.mkdtemp(prefix="ked-bench-serving-"))
    began = time.perf_counter()
    about = machine()
    loaded = load_model(ModelConfig(source=args.model_source, device="cpu"), cache_dir=args.cache)
    ends = sorted(end_of_sequence_ids(loaded.model, loaded.tokenizer))
    daemon = Daemon(args, work)
    try:
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=600)
        model_id = client.models.list().data[0].id
        sides: dict[str, Side] = {
            "transformers": (lambda p: transformers_request(loaded, ends, p, args.max_tokens), time.process_time),
            "daemon": (lambda p: daemon_request(client, model_id, p, args.max_tokens), daemon.cpu_seconds),
        }
        for request, _ in sides.values():  # warm-up: first-call costs (allocations, kernels) off the clock
            request(prompts[0])
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for round_no in range(args.rounds):
            order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
            for side, result in run_paired(sides, order, prompts).items():
                rounds.setdefault((side, 1), []).append(result)
            for side in order:
                result = run_condition(sides[side], prompts, args.concurrency)
                rounds.setdefault((side, args.concurrency), []).append(result)
            for (side, concurrency), results in sorted(rounds.items()):
                result = results[-1]
                print(
                    f"round {round_no + 1} {side:12} x{concurrency}: {result['tokens_per_s']:.1f} tokens/s, "
                    f"TTFT median {result['ttft_median_s'] * 1000:.0f} ms",
                    file=sys.stderr,
                )
        client.close()
    finally:
        daemon.stop()
    report = _report(args, about, prompts, rounds, time.perf_counter() - began, work, argv)
    shutil.rmtree(work, ignore_errors=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "serving.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0


def _report(
    args: argparse.Namespace,
    about: dict[str, Any],
    prompts: list[str],
    rounds: dict[tuple[str, int], list[dict[str, Any]]],
    seconds: float,
    work: Path,
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    conditions = []
    for concurrency in (1, args.concurrency):
        ours, theirs = rounds[("daemon", concurrency)], rounds[("transformers", concurrency)]
        row = {
            "concurrency": concurrency,
            "daemon_tokens_per_s": _median(ours, "tokens_per_s"),
            "transformers_tokens_per_s": _median(theirs, "tokens_per_s"),
            "daemon_ttft_median_s": _median(ours, "ttft_median_s"),
            "transformers_ttft_median_s": _median(theirs, "ttft_median_s"),
            "rounds": {"daemon": [_strip(r) for r in ours], "transformers": [_strip(r) for r in theirs]},
            "same_texts": all(a["texts"] == b["texts"] for a in ours for b in theirs),
            "same_token_counts": all(a["token_counts"] == b["token_counts"] for a in ours for b in theirs),
        }
        row["daemon_tokens_per_cpu_s"] = _median(ours, "tokens_per_cpu_s")
        row["transformers_tokens_per_cpu_s"] = _median(theirs, "tokens_per_cpu_s")
        row["tokens_per_cpu_s_ratio"] = row["daemon_tokens_per_cpu_s"] / row["transformers_tokens_per_cpu_s"]
        row["tokens_per_s_ratio"] = row["daemon_tokens_per_s"] / row["transformers_tokens_per_s"]
        row["ttft_ratio"] = row["transformers_ttft_median_s"] / row["daemon_ttft_median_s"]
        row["meets_target"] = row["tokens_per_s_ratio"] >= TARGET and row["ttft_ratio"] >= TARGET
        conditions.append(row)
    differing = [
        {"prompt": prompt, "daemon": a, "transformers": b}
        for prompt, a, b in zip(
            prompts, rounds[("daemon", 1)][0]["texts"], rounds[("transformers", 1)][0]["texts"], strict=True
        )
        if a != b
    ]
    return {
        "command": "python -m bench.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": about | {"load_avg_at_end": os.getloadavg()},
        "model_source": args.model_source,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "target_ratio": TARGET,
        "seconds": round(seconds, 1),
        "conditions": conditions,
        "differing_texts": differing,
    }


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "texts"}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving speed: the daemon's streaming chat completions against transformers' `generate`",
        "",
        f"`{report['command']}` ({report['date']}, {report['seconds']} s in all)",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch {report['machine']['torch']} "
        f"({report['machine']['torch_threads']} threads), transformers {report['machine']['transformers']}; load average "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_avg_at_start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_avg_at_end'])} at the end.",
        "",
        f"Model `{report['model_source']}`, {report['prompts']} chat prompts, greedy, max_tokens {report['max_tokens']}, "
        f"medians of {report['rounds']} alternating rounds. Ratios: daemon / transformers for tokens/s, "
        f"transformers / daemon for time to first token (TTFT); target >= {report['target_ratio']}.",
        "",
        "| streams | daemon tokens/s | transformers tokens/s | ratio | daemon TTFT ms | transformers TTFT ms | ratio | target met | same greedy text |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    cpu_lines = [
        "",
        "The same runs counted in tokens per CPU second of the serving process (the daemon's process; this one for "
        "transformers), which other load on the machine does not change:",
        "",
        "| streams | daemon tokens per CPU s | transformers tokens per CPU s | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for row in report["conditions"]:
        lines.append(
            f"| {row['concurrency']} | {row['daemon_tokens_per_s']:.1f} | {row['transformers_tokens_per_s']:.1f} | "
            f"{row['tokens_per_s_ratio']:.2f} | {row['daemon_ttft_median_s'] * 1000:.0f} | "
            f"{row['transformers_ttft_median_s'] * 1000:.0f} | {row['ttft_ratio']:.2f} | "
            f"{'yes' if row['meets_target'] else 'NO'} | {'yes' if row['same_texts'] else 'no'} |"
        )
    for row in report["conditions"]:
        cpu_lines.append(
            f"| {row['concurrency']} | {row['daemon_tokens_per_cpu_s']:.1f} | {row['transformers_tokens_per_cpu_s']:.1f} | "
            f"{row['tokens_per_cpu_s_ratio']:.2f} |"
        )
    lines += cpu_lines
    if report["differing_texts"]:
        lines += ["", f"{len(report['differing_texts'])} prompt(s) gave different greedy texts (see serving.json)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
