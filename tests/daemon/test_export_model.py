"""`daemon.commands.export_model`: export a version while the daemon runs, read-only, as hf or as a PEFT adapter.

The state directory and ledger are real (tests/daemon/test_model_state.py's `World`: a tiny Llama saved as
a local model directory, SQLite, artefacts). The running daemon is played by another *process* that holds
the model lock, and by a history in this process that keeps committing while the export runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from daemon.commands.export_model import add_export_model_arguments, run_export_model
from daemon.config import Settings
from editing.errors import ModelMismatch
from editing.state.adapters import ADAPTER_CONFIG_NAME
from editing.state.export import EXPORT_INFO_NAME, ExportError
from store.db import make_read_session_factory
from store.errors import UnknownVersion
from store.lock import ModelInUse, ModelLock
from store.retention import BeyondHorizon
from tests.daemon.test_model_state import (  # noqa: F401 - fixtures, registered by importing them
    World,
    logits,
    tiny_model_dir_fixture,
    world_fixture,
    worlds_fixture,
)

peft = pytest.importorskip("peft")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: float32 tiny model; PEFT's unmerged forward differs from merged weights by rounding only
LOGIT_ATOL = 1e-4


def export(world: World, *argv: str, settings: Settings | None = None) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    add_export_model_arguments(parser)
    out = io.StringIO()
    code = run_export_model(
        settings or world.settings, make_read_session_factory(world.engine), parser.parse_args(argv), out
    )
    return code, out.getvalue()


@contextmanager
def daemon_process(world: World) -> Iterator[None]:
    """Another process holding the model lock as the daemon does, until the block ends."""
    script = (
        "import sys; from pathlib import Path; from store.lock import ModelLock\n"
        "lock = ModelLock(Path(sys.argv[1]), 'daemon'); lock.acquire(); print('held', flush=True); sys.stdin.read()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(world.state_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def snapshot(world: World) -> dict[str, tuple[int, int]]:
    """Every file of the state directory with its size and modification time (the export must change none)."""
    return {
        str(p.relative_to(world.state_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in world.state_dir.rglob("*")
        if p.is_file() and not p.name.startswith("model.lock")  # the other process's lock files
    }


def test_an_export_runs_while_another_process_holds_the_model_lock(world: World, tmp_path: Path) -> None:
    history = world.open()
    tokenizer = world.load().tokenizer
    expected = {}
    for seed in (1, 2):
        world.commit(history, seed)
        expected[seed] = logits(history.state.model, tokenizer)
    before = snapshot(world)

    with daemon_process(world):
        with pytest.raises(ModelInUse):  # the lock really is held, by the other process
            ModelLock(world.state_dir, "test").acquire()
        code, out = export(world, "--version", "v1", "--json", str(tmp_path / "v1"))
        assert code == 0
        code_now, text = export(world, str(tmp_path / "current"))
        assert code_now == 0
        with pytest.raises(ModelInUse):  # and still is: the export never took or broke it
            ModelLock(world.state_dir, "test").acquire()

    result = json.loads(out)
    assert (result["version"], result["format"], result["weights_sha256"]) == (1, "hf", world.recorded_hash(1))
    assert text.startswith(f"exported v2 (weights sha256 {world.recorded_hash(2)[:16]}…")
    for version, folder in ((1, "v1"), (2, "current")):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert torch.equal(logits(reloaded, tokenizer), expected[version])
        info = json.loads((tmp_path / folder / EXPORT_INFO_NAME).read_text())
        assert info["weights_sha256"] == world.recorded_hash(version)
    assert snapshot(world) == before and world.current_version() == 2 and world.reverts() == []


def test_a_peft_export_reproduces_the_daemons_logits_on_the_base_model(
    world: World, tiny_model_dir: Path, tmp_path: Path
) -> None:
    history = world.open()
    tokenizer = world.load().tokenizer
    for seed in (1, 2):
        world.commit(history, seed)
    served = logits(history.state.model, tokenizer)

    with daemon_process(world):
        code, out = export(world, "--format", "peft", "--json", str(tmp_path / "exact"))
        assert code == 0
        code, text = export(world, "--format", "peft", "--rank", "auto", str(tmp_path / "auto"))
        assert code == 0

    result = json.loads(out)
    assert (result["version"], result["format"], result["truncated"]) == (2, "peft", False)
    assert result["weights_sha256"] == world.recorded_hash(2) and result["logit_error"]["max_abs"] < LOGIT_ATOL
    assert "PEFT adapter, truncated to rank 6" in text and "logit error on 8 fixed prompts: max" in text
    config = json.loads((tmp_path / "exact" / ADAPTER_CONFIG_NAME).read_text())
    assert config["target_modules"] == world.settings.model.edit_modules
    for folder in ("exact", "auto"):  # two rank-3 commits: rank 6 holds the delta up to float32 rounding
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        model = peft.PeftModel.from_pretrained(base, str(tmp_path / folder)).eval()
        assert float((logits(model, tokenizer) - served).abs().max()) < LOGIT_ATOL


def test_an_export_while_the_daemon_commits_gives_exactly_the_version_asked_for(world: World, tmp_path: Path) -> None:
    history = world.open()
    world.commit(history, 1)
    errors: list[BaseException] = []

    def keep_committing() -> None:
        try:
            for seed in (2, 3, 4):
                world.commit(history, seed)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    daemon = threading.Thread(target=keep_committing)
    daemon.start()
    code, out = export(world, "--version", "1", "--format", "peft", "--rank", "3", "--json", str(tmp_path / "v1"))
    daemon.join(timeout=120)
    assert code == 0 and errors == [] and world.current_version() == 4
    result = json.loads(out)
    assert (result["version"], result["weights_sha256"], result["rank"]) == (1, world.recorded_hash(1), 3)


def test_refusals(worlds: Callable[..., World], tmp_path: Path) -> None:
    world = worlds(snapshot_every=2, retention_commits=2)
    history = world.open()
    for seed in range(1, 7):
        world.commit(history, seed)
    with pytest.raises(ExportError, match="--rank applies to --format peft only"):
        export(world, "--rank", "4", str(tmp_path / "a"))
    with pytest.raises(UnknownVersion, match="no commit with version 9"):
        export(world, "--version", "9", str(tmp_path / "a"))
    with pytest.raises(BeyondHorizon, match="cannot export version 3: it is beyond the retention horizon"):
        export(world, "--version", "3", str(tmp_path / "a"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an empty directory"):
        export(world, str(taken))
    with pytest.raises(SystemExit):  # argparse: a rank that is not a number or 'auto'
        export(world, "--format", "peft", "--rank", "0", str(tmp_path / "a"))
    # Another module set than the edits were made on: refused before anything is written.
    model = world.settings.model.model_copy(update={"edit_modules": ["model.layers.0.mlp.up_proj"]})
    with pytest.raises(ModelMismatch, match="edits were made on modules"):
        export(world, str(tmp_path / "a"), settings=world.settings.model_copy(update={"model": model}))
    assert not (tmp_path / "a").exists() and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
