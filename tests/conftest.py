"""Fixtures shared by every test package.

- `shared_data`: the shared data folder (`KED_SHARED_DATA`, default ../shared/data beside the repo).
- `default_model`: the real default model (SmolLM2-135M-Instruct GGUF), loaded once per session.
- `model_cache_dir`: where the de-quantised default model is cached for all tests (pass it on as
  `ModelConfig(cache_dir=...)` or `KED_MODEL__CACHE_DIR` to subprocesses).
- `postgres_url`: the test server's URL (`KED_TEST_POSTGRES_URL`, default the local server, database test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# De-quantising the default GGUF takes a minute; every test (and test subprocess) shares one copy.
MODEL_CACHE_DIR = Path(os.environ.get("KED_TEST_MODEL_CACHE", REPO_ROOT / ".cache" / "models"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("KED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"shared data folder {path} not found; set KED_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def default_model():  # type: ignore[no-untyped-def]
    from editing.config import ModelConfig
    from editing.model.loading import load_model

    return load_model(ModelConfig(device="cpu", cache_dir=MODEL_CACHE_DIR))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return os.environ.get("KED_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    return MODEL_CACHE_DIR
