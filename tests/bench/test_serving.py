"""`bench/serving.py` end to end on a tiny model: a real daemon process, the official client, transformers' generate.

The figures of a tiny random model mean nothing; what is tested is that one run measures both sides on the
same prompts with the same greedy decoding (the texts agree token for token) and writes its report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.serving import main
from tests.daemon.conftest import tiny_lm
from tests.daemon.test_model_state import EDIT_MODULES

__all__ = ["tiny_lm"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.slow
def test_one_run_measures_both_sides_on_the_same_greedy_text(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny_lm
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        tokenizer.save_pretrained(model_dir)
    finally:
        tokenizer.chat_template = None  # the session's tokenizer is shared
    out = tmp_path / "results"

    code = main([
        "--model-source", str(model_dir), "--prompts", "3", "--max-tokens", "6", "--concurrency", "2",
        "--rounds", "1", "--output", str(out), "--cache", str(tmp_path / "cache"),
        "--daemon-env", f"KED_MODEL__EDIT_MODULES={json.dumps(EDIT_MODULES)}",
    ])

    assert code == 0
    report = json.loads((out / "serving.json").read_text())
    assert [row["concurrency"] for row in report["conditions"]] == [1, 2]
    for row in report["conditions"]:
        assert row["daemon_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
        assert row["tokens_per_s_ratio"] == pytest.approx(row["daemon_tokens_per_s"] / row["transformers_tokens_per_s"])
        assert row["same_texts"] and row["same_token_counts"]
        assert all(count == 6 for count in row["rounds"]["daemon"][0]["token_counts"])  # random model: no early end
    assert report["differing_texts"] == []
    markdown = (out / "serving.md").read_text()
    assert report["command"] in markdown and "| 2 |" in markdown
