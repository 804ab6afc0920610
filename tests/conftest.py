"""Fixtures shared by every test package.

- `shared_data`: the shared data folder (`KED_SHARED_DATA`, default ../shared/data beside the repo).
- `default_model`: the real default model (SmolLM2-135M-Instruct GGUF), loaded once per session.
- `model_cache_dir`: where the de-quantised default model is cached for all tests (pass it on as
  `ModelConfig(cache_dir=...)` or `KED_MODEL__CACHE_DIR` to subprocesses).
- `postgres_url`: the test server's URL (`KED_TEST_POSTGRES_URL`, default the local server, database test).

A test also fails on a DeprecationWarning or FutureWarning that a library raises because of a call from
our packages, in its setup, call or teardown (the `pytest_runtest_*` wrappers below). The
`filterwarnings` of pyproject.toml cannot say this: a library attributes its warning to whichever frame
its `stacklevel` names (for a model's forward, torch's `Module.__call__`), so a filter by module misses
it. A library's warning with no code of ours on the stack (e.g. at import) is left to the library.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import pytest

pytest_plugins = ["pytester"]  # tests/test_deprecations.py runs the suite's warning policy in a pytest of its own

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


OUR_PACKAGES = frozenset({"daemon", "ingest", "editing", "store"})
DEPRECATIONS = (DeprecationWarning, FutureWarning)


def _our_frame(frame: FrameType | None) -> str | None:
    """file:line of the innermost frame on `frame`'s stack that runs code of our packages, if any."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).partition(".")[0] in OUR_PACKAGES:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class DeprecationsWeCause:
    """A `warnings.showwarning` that notes each deprecation shown while code of ours is on the stack.

    `showwarning` runs inside the `warnings.warn` call, so the stack is the one that raised the warning.
    Warnings are passed on to the previous `showwarning` (pytest records them as usual); a warning that
    a filter ignores is never shown, so an "ignore" entry in `filterwarnings` still silences one.
    """

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.found: list[str] = []

    def showwarning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, DEPRECATIONS) and (caller := _our_frame(sys._getframe(1))) is not None:
            self.found.append(f"{category.__name__}: {message} (called from {caller})")
        self.previous(message, category, filename, lineno, file, line)


def _failing_on_deprecations_we_cause() -> Generator[None, object, object]:
    """Wrap one phase of a test (setup, call, teardown): it fails if a call of ours used something deprecated."""
    seen = DeprecationsWeCause(warnings.showwarning)
    warnings.showwarning = seen.showwarning
    try:
        result = yield
    finally:
        warnings.showwarning = seen.previous
    if seen.found:
        pytest.fail("deprecated use from our code:\n" + "\n".join(seen.found), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _failing_on_deprecations_we_cause())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _failing_on_deprecations_we_cause())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _failing_on_deprecations_we_cause())
