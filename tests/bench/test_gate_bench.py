"""`bench/gate.py`: each run drives the daemon's edit loop on a temporary ledger and reports what it recorded.

A tiny Llama loaded from a local Hugging Face directory, an untrained EMSEdit editor, synthetic facts
and the standing prompts as the probe suite: the figures mean nothing, the wiring is what is tested
(facts pending in a fresh ledger, batches through `EditLoop.run_batch`, end states read back).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench.gate import Calls, Env, run_stream
from editing.config import EditorConfig, ModelConfig
from editing.data import EditExample
from editing.engine.emsedit import EMSEditor
from editing.gate.config import GateConfig
from editing.gate.specificity import FrozenBase, ReferenceStore
from editing.model.edit_metrics import evaluate_examples
from editing.model.loading import load_model
from editing.state.weights import WeightState
from tests.daemon.conftest import tiny_lm
from tests.daemon.test_model_state import EDIT_MODULES, tiny_model_dir_fixture

__all__ = ["tiny_lm", "tiny_model_dir_fixture"]

PASS_ALL = GateConfig(
    min_efficacy=0.0, min_agreement=0.0, max_kl=1e9, min_batch_agreement=0.0, max_batch_kl=1e9, specificity_prompts=4
)
FAIL_SPECIFICITY = GateConfig(
    min_efficacy=0.0, min_agreement=1.0, max_kl=1e-7, min_batch_agreement=1.0, max_batch_kl=1e-7, specificity_prompts=4
)


def make_env(model_dir: Path, tmp_path: Path, facts: int = 4, batch_size: int = 2) -> Env:
    model_config = ModelConfig(source=str(model_dir), device="cpu", edit_modules=EDIT_MODULES)
    loaded = load_model(model_config, cache_dir=tmp_path / "model-cache")
    editor_config = EditorConfig(rank=8, n_blocks=1, lm_batch_size=4, edit_lr=0.05)
    editor = EMSEditor(loaded.model, loaded.tokenizer, EDIT_MODULES, editor_config)
    base = FrozenBase.capture(loaded.model, loaded.fingerprint, [f"{n}.weight" for n in EDIT_MODULES])
    examples = [
        EditExample(
            prompt=f"The capital of country {i} is",
            target_new=f"Paris {i}",
            rephrase_prompts=(f"Country {i} has its capital in",),
            locality=(("Lionel Messi plays", "football"),),
        )
        for i in range(facts)
    ]
    return Env(
        args=argparse.Namespace(batch_size=batch_size, max_batches=None, probe_every=1),
        loaded=loaded,
        model_config=model_config,
        editor_config=editor_config,
        editor=editor,
        state=WeightState(loaded.model, EDIT_MODULES),
        references=ReferenceStore(base, directory=tmp_path / "references"),
        examples=examples,
        base_eval=evaluate_examples(loaded.model, loaded.tokenizer, examples, batch_size=4),
        base_stats=editor.edit_state(),
        proposes=Calls(),
        info={"editor": {"editor_safetensors_sha256": "0" * 64}},
    )


@pytest.fixture(name="env")
def env_fixture(tiny_model_dir: Path, tmp_path: Path) -> Env:
    return make_env(tiny_model_dir, tmp_path)


def test_a_run_commits_every_batch_through_the_loop_and_reads_the_ledger(env: Env) -> None:
    saved: list[dict[str, Any]] = []
    run = run_stream(env, "gated", PASS_ALL, lambda partial: saved.append(dict(partial)))

    assert run["complete"] and run["counts"] == {"committed": 4}
    assert run["fact_status"] == ["committed"] * 4 and run["fact_attempts"] == [1] * 4
    assert run["version"] == 2  # two batches of two, one commit each
    assert [b["statuses"] for b in run["batches"]] == [{"committed": 2}, {"committed": 2}]
    assert [[o["fact"] for o in b["outcomes"]] for b in run["batches"]] == [[0, 1], [2, 3]]  # oldest first
    assert all(b["agreement"] is not None and b["edit_s"] > 0 and b["measures"] >= 1 for b in run["batches"])
    assert [p["version"] for p in run["probes"]] == [1, 2]
    assert run["final"]["efficacy"] is not None and saved

    again = run_stream(env, "ungated", PASS_ALL.model_copy(update={"enabled": False}), lambda partial: None)
    # each run starts from the base model: the first batch measures the same as before
    assert again["batches"][0]["agreement"] == run["batches"][0]["agreement"]
    assert again["batches"][0]["mean_kl"] == run["batches"][0]["mean_kl"]
    assert again["counts"] == {"committed": 4} and again["version"] == 2


def test_facts_the_gate_rejects_end_rejected_in_the_ledger(env: Env) -> None:
    run = run_stream(env, "gated", FAIL_SPECIFICITY, lambda partial: None)

    assert run["counts"] == {"rejected": 4} and run["version"] == 0
    assert all(b["statuses"] == {"rejected": 2} and "agreement" not in b for b in run["batches"])
    assert "stopped" not in run
