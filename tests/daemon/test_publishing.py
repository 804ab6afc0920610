"""`daemon.publishing`: `[publish]` writes each version atomically, points `current` at it, and POSTs to serving engines.

The model is a copy of the tiny Llama of tests/daemon/conftest.py with a real `WeightState`; versions are
made by publishing staged deltas, as a commit does. The serving engine is a real HTTP server on a loopback
port that records every request and answers from a script of status codes.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import daemon.publishing as publishing
from daemon.publishing import (
    CURRENT_INFO_NAME,
    CURRENT_LINK,
    PUBLISH_INFO_NAME,
    PublishConfig,
    Publisher,
    render,
)
from editing.model.loading import LoadedModel, model_fingerprint
from editing.state.adapters import ADAPTER_CONFIG_NAME
from editing.state.export import EXPORT_INFO_NAME, WEIGHTS_NAME
from editing.state.weights import WeightState

MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


class Engine:
    """A loopback HTTP server standing in for vLLM: records (path, JSON body, headers), answers scripted statuses."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                engine.requests.append((self.path, body, dict(self.headers)))
                time.sleep(engine.delay)
                status = engine.statuses.pop(0) if engine.statuses else 200
                self.send_response(status)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"engine says no")

            def log_message(self, *args: Any) -> None:  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def engine() -> Iterator[Engine]:
    made = Engine()
    yield made
    made.close()


@pytest.fixture
def live(tiny_lm: tuple[Any, Any]) -> tuple[LoadedModel, WeightState]:
    """A private copy of the tiny model (the session's one is shared) and its weight state at version 0."""
    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    return LoadedModel(model, tokenizer, "tiny", None, model_fingerprint(model)), WeightState(model, MODULES)


def commit(state: WeightState, version: int) -> None:
    """Publish a random rank-2 delta as `version` on top of the live masters, as a commit does."""
    gen = torch.Generator().manual_seed(version)
    deltas = {
        name: 0.01 * torch.randn(base.shape[0], 2, generator=gen) @ torch.randn(2, base.shape[1], generator=gen)
        for name, base in state.base().items()
    }
    state.publish(state.stage_commit(version, deltas))


def revert(state: WeightState, version: int, masters: dict[str, torch.Tensor]) -> None:
    state.publish(state.staged(version, masters))


def config(tmp_path: Path, **values: Any) -> PublishConfig:
    return PublishConfig.model_validate({"enabled": True, "directory": str(tmp_path / "published"), **values})


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    made: list[Publisher] = []
    yield made
    for publisher in made:
        publisher.stop()


def started(made: list[Publisher], cfg: PublishConfig, live: tuple[LoadedModel, WeightState]) -> Publisher:
    publisher = Publisher(cfg, *live)
    made.append(publisher)
    publisher.start()
    return publisher


def test_each_version_is_written_whole_and_current_points_at_it(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], publishers: list[Publisher]
) -> None:
    _, state = live
    publisher = started(publishers, config(tmp_path, format="both", keep=2), live)
    assert publisher.wait_idle(60)
    root = tmp_path / "published"
    assert (root / CURRENT_LINK).is_symlink() and (root / CURRENT_LINK).readlink() == Path("v0")
    masters = {0: state.masters()}
    for version in (1, 2):
        commit(state, version)
        masters[version] = state.masters()
        publisher.version_changed()
        assert publisher.wait_idle(60)
        current = json.loads((root / CURRENT_INFO_NAME).read_text())
        assert (current["version"], current["weights_sha256"]) == (version, state.weights_sha256())
        assert (root / CURRENT_LINK).readlink() == Path(f"v{version}")
        folder = root / f"v{version}"
        assert (folder / "hf" / WEIGHTS_NAME).is_file() and (folder / "peft" / ADAPTER_CONFIG_NAME).is_file()
        for part in ("hf", "peft"):
            info = json.loads((folder / part / EXPORT_INFO_NAME).read_text())
            assert (info["version"], info["weights_sha256"]) == (version, state.weights_sha256())
        assert current["peft_path"] == str((folder / "peft").resolve())
    # keep = 2: v0 is gone, v1 (the previous) and v2 (current) stay; nothing half-written is left behind
    assert sorted(p.name for p in root.iterdir()) == [CURRENT_LINK, CURRENT_INFO_NAME, "v1", "v2"]

    revert(state, 1, masters[1])  # back to a version still on disk: reused, not written again
    written_at = (root / "v1" / "hf" / WEIGHTS_NAME).stat().st_mtime_ns
    publisher.version_changed()
    assert publisher.wait_idle(60)
    assert (root / CURRENT_LINK).readlink() == Path("v1")
    assert (root / "v1" / "hf" / WEIGHTS_NAME).stat().st_mtime_ns == written_at
    stats = publisher.stats()
    assert (stats.published, stats.reused, stats.failures, stats.last_version) == (4, 1, 0, 1)


def test_a_failed_write_leaves_nothing_half_written_and_the_next_version_publishes(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], publishers: list[Publisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state = live
    publisher = started(publishers, config(tmp_path), live)
    assert publisher.wait_idle(60)
    root = tmp_path / "published"
    import editing.state.adapters as adapters

    real = adapters.export_adapter

    def crash_after_writing(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "export_adapter", crash_after_writing)
    commit(state, 1)
    publisher.version_changed()
    assert publisher.wait_idle(60)
    assert sorted(p.name for p in root.iterdir()) == [CURRENT_LINK, CURRENT_INFO_NAME, "v0"]  # no v1, no staging
    assert json.loads((root / CURRENT_INFO_NAME).read_text())["version"] == 0
    assert publisher.stats().failures == 1

    monkeypatch.setattr(adapters, "export_adapter", real)
    commit(state, 2)
    publisher.version_changed()
    assert publisher.wait_idle(60)
    assert (root / CURRENT_LINK).readlink() == Path("v2") and (root / "v2" / PUBLISH_INFO_NAME).is_file()
    assert publisher.stats().failures == 1 and publisher.stats().last_version == 2


def test_leftovers_of_an_interrupted_publish_are_removed_at_start(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], publishers: list[Publisher]
) -> None:
    root = tmp_path / "published"
    (root / ".staging-v7-abc").mkdir(parents=True)
    (root / ".staging-v7-abc" / "adapter_model.safetensors").write_bytes(b"half")
    publisher = started(publishers, config(tmp_path), live)
    assert publisher.wait_idle(60)
    assert sorted(p.name for p in root.iterdir()) == [CURRENT_LINK, CURRENT_INFO_NAME, "v0"]


def test_the_engine_is_told_with_the_templated_body_and_retried_on_500(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], publishers: list[Publisher], engine: Engine
) -> None:
    _, state = live
    engine.statuses = [200, 500, 503, 200]  # v0 loads at once; v1 needs two retries
    target = {
        "name": "vllm",
        "url": f"{engine.url}/v1/load_lora_adapter",
        "headers": {"Authorization": "Bearer s3cret"},
    }
    publisher = started(publishers, config(tmp_path, urls=[target], backoff_seconds=0.05), live)
    assert publisher.wait_idle(60)
    commit(state, 1)
    publisher.version_changed()
    assert publisher.wait_idle(60)

    adapter = str((tmp_path / "published" / "v1").resolve())
    assert [r[0] for r in engine.requests] == ["/v1/load_lora_adapter"] * 4
    assert engine.requests[-1][1] == {"lora_name": "ked", "lora_path": adapter, "load_inplace": True}
    assert engine.requests[0][1]["lora_path"] == str((tmp_path / "published" / "v0").resolve())
    assert engine.requests[-1][2]["Authorization"] == "Bearer s3cret"
    stats = publisher.stats()
    assert (stats.posts["vllm"], stats.post_failures["vllm"]) == (4, 2)


def test_versioned_names_unload_the_previous_adapter_and_4xx_is_not_retried(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], publishers: list[Publisher], engine: Engine
) -> None:
    _, state = live
    target = {
        "name": "vllm",
        "url": f"{engine.url}/v1/load_lora_adapter",
        "body": {"lora_name": "{name}", "lora_path": "{path}", "version": "{version}"},
        "unload_url": f"{engine.url}/v1/unload_lora_adapter",
    }
    publisher = started(
        publishers, config(tmp_path, urls=[target], adapter_name="ked-v{version}", backoff_seconds=0.05), live
    )
    assert publisher.wait_idle(60)
    commit(state, 1)
    publisher.version_changed()
    assert publisher.wait_idle(60)
    assert [(path, body["lora_name"]) for path, body, _ in engine.requests] == [
        ("/v1/load_lora_adapter", "ked-v0"),
        ("/v1/load_lora_adapter", "ked-v1"),
        ("/v1/unload_lora_adapter", "ked-v0"),
    ]
    assert engine.requests[1][1]["version"] == "1"

    engine.statuses = [400]  # e.g. vLLM refusing an adapter: not retried, counted, nothing unloaded
    commit(state, 2)
    publisher.version_changed()
    assert publisher.wait_idle(60)
    assert [body["lora_name"] for _, body, _ in engine.requests[3:]] == ["ked-v2"]
    assert publisher.stats().post_failures["vllm"] == 1


def test_a_failing_url_never_blocks_the_caller_and_a_newer_version_supersedes_its_retries(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], publishers: list[Publisher], engine: Engine
) -> None:
    _, state = live
    engine.statuses = [500] * 1000
    targets = [{"name": "down", "url": f"{engine.url}/v1/load_lora_adapter"}]
    publisher = started(publishers, config(tmp_path, urls=targets, retries=50, backoff_seconds=30), live)
    deadline = time.monotonic() + 60
    while not engine.requests and time.monotonic() < deadline:  # v0's first POST failed; its retry waits 30 s
        time.sleep(0.05)
    assert len(engine.requests) == 1

    commit(state, 1)
    began = time.monotonic()
    publisher.version_changed()
    assert time.monotonic() - began < 0.5  # the caller (the edit loop) does not wait for disk or network
    engine.statuses = []
    assert publisher.wait_idle(60)  # v0's retries were abandoned at once for v1, which loaded
    assert [body["lora_path"].rsplit("/", 1)[1] for _, body, _ in engine.requests] == ["v0", "v1"]
    assert publisher.stats().post_failures["down"] == 1


def test_a_stop_ends_a_post_waiting_for_its_retry(
    tmp_path: Path, live: tuple[LoadedModel, WeightState], engine: Engine
) -> None:
    engine.statuses = [500] * 100
    publisher = Publisher(config(tmp_path, urls=[{"name": "x", "url": engine.url}], backoff_seconds=60), *live)
    publisher.start()
    deadline = time.monotonic() + 60
    while not engine.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    began = time.monotonic()
    publisher.stop(timeout=10)
    assert time.monotonic() - began < 5 and len(engine.requests) == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"enabled": True}, "directory: required when publishing is enabled"),
        ({"format": "hf", "rank": 8}, "applies to the peft format only"),
        ({"rank": 0}, "expected a rank >= 1"),
        ({"format": "zip"}, "format"),
        ({"keep": 0}, "keep"),
        ({"urls": [{"name": "a", "url": "ftp://x/y"}]}, "expected an http:// or https:// URL"),
        ({"urls": [{"name": "a", "url": "http://x", "body": {"p": "{nope}"}}]}, "unknown placeholder"),
        ({"urls": [{"name": "a", "url": "http://x", "body": {"p": "{name"}}]}, "not a valid template"),
        ({"urls": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}, "its own name"),
        ({"urls": [{"name": "a b", "url": "http://x"}]}, "name"),
        ({"urls": [{"name": "a", "url": "http://x", "headers": {"Bad Name": "v"}}]}, "not a valid header name"),
        ({"urls": [{"name": "a", "url": "http://x", "body": {"p": "{hf_path}"}}]}, "which format peft does not write"),
        ({"adapter_name": "ked-{fact}"}, "may only name {version}"),
        ({"urls": [{"name": "a", "url": "http://x", "surprise": 1}]}, "surprise"),
    ],
)
def test_bad_configuration_is_refused_naming_the_place(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PublishConfig.model_validate(values)


def test_defaults_are_off_and_templates_fill_only_string_values() -> None:
    assert PublishConfig().enabled is False
    body = {"lora_name": "{name}", "load_inplace": True, "tags": ["v{version}"]}
    assert render(body, {"name": "ked", "version": "3"}) == {"lora_name": "ked", "load_inplace": True, "tags": ["v3"]}
    assert publishing.DEFAULT_LOAD_BODY == {"lora_name": "{name}", "lora_path": "{path}", "load_inplace": True}
