"""Publishing each new version for serving engines: `[publish]`, written after every commit and revert.

After a commit or a revert the daemon calls `Publisher.version_changed()`. That call only takes the
live version's masters (shared, not copied) and its weights hash under the read lock and hands them
to the publisher's own thread; it never waits for disk or network, so editing and serving never wait
for publishing. The thread then:

1. writes the version into `<directory>/v<version>/`: the export is staged in a hidden directory
   beside it (`.staging-*`) and renamed into place, so `v<version>/` is either absent or complete.
   Layout: with `format = "peft"` (default) or `"hf"` the directory *is* the adapter or model
   directory (`editing.state.adapters`, `editing.state.export`); with `"both"` it holds `hf/` and
   `peft/`. `v<version>/ked-publish.json` says what was written. A version already published in the
   same format and with the same weights hash (a revert back to it) is reused, not written again.
2. points `<directory>/current` at it: a relative symlink `current -> v<version>`, replaced
   atomically (a new symlink renamed over the old one), and `<directory>/current.json` (version,
   path, weights hash, format), also written to a temporary file and renamed. Readers see the old
   or the new version, never a mix.
3. removes published versions beyond the newest `keep` (by time of publishing), never the current.
4. POSTs to each configured URL, in order, with JSON bodies built from templates (vLLM's
   `/v1/load_lora_adapter` by default): retried with exponential back-off on connection errors,
   timeouts, 429 and 5xx; other 4xx answers are not retried. A POST still retrying when a newer
   version is ready is abandoned (the newer one is what should be loaded). With `unload_url`, the
   adapter this target loaded before is unloaded after the new one loaded (when its name differs).

Versions that change faster than they can be written are coalesced: the thread always publishes the
newest version waiting and counts the ones it skipped. A failure is logged and counted
(`PublishStats`), and the next version is published as usual. `Publisher.start()` publishes the
live version once (the daemon may have been reverted while stopped).

This module does not import prometheus_client (daemon/metrics.py owns every metric): `stats()` gives
the counters for a collector to read. The model modules are imported when a publisher is built, so
importing the configuration stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import string
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from editing.model.loading import LoadedModel
    from editing.state.weights import StagedWeights, WeightState

log = structlog.get_logger(__name__)

PUBLISH_INFO_NAME = "ked-publish.json"
CURRENT_LINK = "current"
CURRENT_INFO_NAME = "current.json"
_VERSION_DIR = re.compile(r"^v(\d+)$")
#: What a body template may name; `previous_*` are empty when nothing was loaded before.
PLACEHOLDERS = frozenset(
    {"name", "path", "hf_path", "peft_path", "version", "weights_sha256", "previous_name", "previous_path", "previous_version"}
)
DEFAULT_LOAD_BODY: dict[str, Any] = {"lora_name": "{name}", "lora_path": "{path}", "load_inplace": True}
DEFAULT_UNLOAD_BODY: dict[str, Any] = {"lora_name": "{previous_name}"}


def _placeholders(value: Any, where: str) -> set[str]:
    """Every `{placeholder}` in the string values of a JSON template; ValueError for a bad or unknown one."""
    if isinstance(value, str):
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"{where}: {value!r} is not a valid template ({exc}); write {{{{ and }}}} for braces") from None
        unknown = names - PLACEHOLDERS
        if unknown:
            raise ValueError(f"{where}: unknown placeholder(s) {sorted(unknown)}; known: {sorted(PLACEHOLDERS)}")
        return names
    if isinstance(value, Mapping):
        return set().union(*(_placeholders(v, f"{where}.{k}") for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_placeholders(v, f"{where}[{i}]") for i, v in enumerate(value)))
    return set()


def render(template: Any, values: Mapping[str, str]) -> Any:
    """The template with `{placeholder}`s in its string values filled in; other JSON values kept as they are."""
    if isinstance(template, str):
        return template.format_map(values)
    if isinstance(template, Mapping):
        return {k: render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, values) for v in template]
    return template


def _check_url(url: str, where: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: expected an http:// or https:// URL with a host, got {url!r}")
    return url


class PublishUrl(BaseModel):
    """One serving engine to tell about each published version (vLLM's runtime LoRA loading by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="A short name for logs and metrics (the URL is never a label)."
    )
    url: str = Field(..., description="Where to POST, e.g. http://127.0.0.1:8000/v1/load_lora_adapter.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra request headers (e.g. Authorization; set secrets through KED_* variables)."
    )
    body: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_LOAD_BODY),
        description="The JSON body; string values may name {name}, {path}, {hf_path}, {peft_path}, {version}, "
        "{weights_sha256}, {previous_name}, {previous_path}, {previous_version}.",
    )
    unload_url: str | None = Field(
        None,
        description="POSTed after a successful load when this target had loaded an adapter under another name "
        "(e.g. http://127.0.0.1:8000/v1/unload_lora_adapter).",
    )
    unload_body: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_UNLOAD_BODY), description="The JSON body of the unload POST (a template)."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, "url")

    @field_validator("unload_url")
    @classmethod
    def _unload_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, "unload_url")

    @model_validator(mode="after")
    def _templates(self) -> PublishUrl:
        _placeholders(self.body, "body")
        _placeholders(self.unload_body, "unload_body")
        for key, value in self.headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key) or "\n" in value or "\r" in value:
                raise ValueError(f"headers: {key!r} is not a valid header name, or its value has a line break")
        return self


class PublishConfig(BaseModel):
    """Publishing every new version into a directory for serving engines, and telling them (docs/serving.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Publish after every commit and revert (and once at start).")
    directory: Path | None = Field(None, description="Where v<version>/ and the current pointer go; required when enabled.")
    format: Literal["hf", "peft", "both"] = Field(
        "peft", description="peft: the delta as a LoRA adapter; hf: a whole model directory; both: hf/ and peft/."
    )
    rank: int | Literal["auto"] | None = Field(
        None,
        description="The LoRA rank: none for the exact adapter (rank min(in, out)), a number to truncate, or auto "
        "(the delta's numerical rank); the measured logit error is written into each adapter's ked-export.json.",
    )
    adapter_name: str = Field(
        "ked",
        pattern=r"^[A-Za-z0-9_.{}-]{1,64}$",
        description="The {name} of a version in the POST bodies; may contain {version} (e.g. ked-v{version}).",
    )
    base_model: str | None = Field(
        None, description="What adapter_config.json names as the base model (default: [model] source)."
    )
    keep: int = Field(3, ge=1, le=10_000, description="Published versions kept on disk (the current one always).")
    urls: list[PublishUrl] = Field(default_factory=list, description="Serving engines to POST to after each version.")
    retries: int = Field(5, ge=0, le=100, description="Retries of a failed POST (connection error, timeout, 429, 5xx).")
    backoff_seconds: float = Field(1.0, gt=0, le=3600, description="Wait before the first retry; doubled each time.")
    max_backoff_seconds: float = Field(60.0, gt=0, le=86_400, description="Longest wait between retries.")
    timeout_seconds: float = Field(30.0, gt=0, le=3600, description="Timeout of one POST (loading an adapter takes a while).")

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"expected a rank >= 1, 'auto' or none (exact), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PublishConfig:
        if self.enabled and self.directory is None:
            raise ValueError("directory: required when publishing is enabled")
        if self.format == "hf" and self.rank is not None:
            raise ValueError("rank: applies to the peft format only (format is hf)")
        names = [target.name for target in self.urls]
        if len(set(names)) != len(names):
            raise ValueError(f"urls: each target needs its own name, got {names}")
        try:
            "".join(string.Formatter().format(self.adapter_name, version=0))
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"adapter_name: {self.adapter_name!r} may only name {{version}}") from None
        written = {"hf": {"hf_path"}, "peft": {"peft_path"}, "both": {"hf_path", "peft_path"}}[self.format]
        for target in self.urls:
            missing = (_placeholders(target.body, "body") & {"hf_path", "peft_path"}) - written
            if missing:
                raise ValueError(f"urls[{target.name}].body names {sorted(missing)}, which format {self.format} does not write")
        return self


@dataclass(frozen=True)
class PublishStats:
    """What the publisher has done since it started (for metrics and the bench)."""

    published: int = 0
    reused: int = 0
    failures: int = 0
    skipped: int = 0
    last_version: int | None = None
    last_seconds: float | None = None
    posts: Mapping[str, int] = field(default_factory=dict)
    post_failures: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    """A version on disk: its directory, where the hf and peft exports are in it, its hash."""

    version: int
    directory: Path
    hf_path: Path | None
    peft_path: Path | None
    weights_sha256: str


@dataclass
class _Loaded:
    name: str
    path: str
    version: int


class Publisher:
    """Publishes versions in a thread of its own (module docstring). `start()`, `version_changed()`, `stop()`.

    `transport` replaces httpx's network transport (tests); `clock` times each publish.
    """

    def __init__(
        self,
        config: PublishConfig,
        loaded: LoadedModel,
        state: WeightState,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from editing.state.adapters import probe_token_ids

        if config.directory is None:
            raise ValueError("publish.directory is required to publish")
        self.config = config
        self.directory = config.directory
        self.loaded = loaded
        self.state = state
        self._clock = clock
        # Tokenised here, on the constructing thread: fast tokenizers must not be used from two threads at once.
        self._probe_ids = probe_token_ids(loaded.tokenizer)
        self._client = httpx.Client(timeout=config.timeout_seconds, transport=transport)
        self._cond = threading.Condition()
        self._pending: StagedWeights | None = None
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loaded: dict[str, _Loaded] = {}
        self._stats = PublishStats(posts=dict.fromkeys(self._names(), 0), post_failures=dict.fromkeys(self._names(), 0))

    def _names(self) -> list[str]:
        return [target.name for target in self.config.urls]

    # --- the caller's side ----------------------------------------------------------------------

    def start(self) -> None:
        """Clear leftovers of an interrupted publish, start the thread and publish the live version."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.directory.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()
        self.version_changed()

    def version_changed(self) -> None:
        """Queue the live version for publishing; returns at once and never raises (call after a commit or revert)."""
        from editing.state.export import live_or_staged

        try:
            snapshot = live_or_staged(self.state, None)
        except Exception:  # publishing must never break the edit loop
            log.exception("publish: cannot read the live version")
            return
        with self._cond:
            if self._pending is not None and self._pending.version != snapshot.version:
                self._bump(skipped=1)
            self._pending = snapshot
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread: a write in progress finishes, POSTs waiting for a retry are abandoned."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("publish: the publisher did not stop in time", timeout=timeout)
        self._client.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in progress; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stats(self) -> PublishStats:
        with self._cond:
            return self._stats

    def _bump(self, **changes: Any) -> None:
        """Update the stats (call with the condition held)."""
        current = self._stats
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key in ("published", "reused", "failures", "skipped"):
                values[key] = getattr(current, key) + value
            elif key in ("posts", "post_failures"):
                counts = dict(getattr(current, key))
                counts[value] = counts.get(value, 0) + 1
                values[key] = counts
            else:
                values[key] = value
        self._stats = PublishStats(**{**current.__dict__, **values})

    # --- the publisher's thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._stopping or self._pending is None:
                    return
                snapshot, self._pending, self._busy = self._pending, None, True
            try:
                self._publish(snapshot)
            except Exception:  # the thread must live on: the next version is published as usual
                log.exception("publish: failed", version=snapshot.version)
                with self._cond:
                    self._bump(failures=1)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _publish(self, snapshot: StagedWeights) -> None:
        began = self._clock()
        published, reused = self.write_version(snapshot)
        self.point_current(published)
        self.prune()
        seconds = self._clock() - began
        with self._cond:
            self._bump(published=1, reused=int(reused), last_version=published.version, last_seconds=seconds)
        log.info("published", version=published.version, directory=str(published.directory), reused=reused, seconds=round(seconds, 3))
        for target in self.config.urls:
            if self._superseded():
                return
            self._notify(target, published)

    def write_version(self, snapshot: StagedWeights) -> tuple[Published, bool]:
        """`<directory>/v<version>/`, written atomically (or reused when it holds these weights already)."""
        from editing.state.adapters import export_adapter
        from editing.state.export import export_model

        final = self.directory / f"v{snapshot.version}"
        marker = self._marker(snapshot)
        existing = self._read_marker(final)
        if existing is not None and all(existing.get(k) == v for k, v in marker.items() if k != "published_at"):
            _write_json(final / PUBLISH_INFO_NAME, existing | {"published_at": marker["published_at"]})
            return self._published(snapshot, final), True
        stage = Path(tempfile.mkdtemp(prefix=f".staging-v{snapshot.version}-", dir=self.directory))
        try:
            fmt = self.config.format
            if fmt in ("hf", "both"):
                export_model(self.loaded, self.state, stage / "hf" if fmt == "both" else stage, staged=snapshot)
            if fmt in ("peft", "both"):
                export_adapter(
                    self.loaded,
                    self.state,
                    stage / "peft" if fmt == "both" else stage,
                    staged=snapshot,
                    rank=self.config.rank,
                    probe_ids=self._probe_ids,
                    base_model=self.config.base_model,
                )
            (stage / PUBLISH_INFO_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            _fsync_directory(stage)
            trash = None
            if final.exists():  # another format or damaged: set aside, replaced, then removed
                trash = self.directory / f".trash-v{snapshot.version}-{os.getpid()}-{time.monotonic_ns()}"
                final.rename(trash)
            stage.rename(final)
            _fsync_directory(self.directory)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return self._published(snapshot, final), False

    def _marker(self, snapshot: StagedWeights) -> dict[str, Any]:
        return {
            "version": snapshot.version,
            "weights_sha256": snapshot.weights_sha256,
            "format": self.config.format,
            "rank": self.config.rank,
            "base_fingerprint": self.loaded.fingerprint,
            "published_at": datetime.now(UTC).isoformat(),
        }

    @staticmethod
    def _read_marker(folder: Path) -> dict[str, Any] | None:
        try:
            value = json.loads((folder / PUBLISH_INFO_NAME).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _published(self, snapshot: StagedWeights, final: Path) -> Published:
        fmt = self.config.format
        hf = (final / "hf" if fmt == "both" else final) if fmt in ("hf", "both") else None
        peft = (final / "peft" if fmt == "both" else final) if fmt in ("peft", "both") else None
        return Published(snapshot.version, final.resolve(), hf and hf.resolve(), peft and peft.resolve(), snapshot.weights_sha256)

    def point_current(self, published: Published) -> None:
        """Swap `current -> v<version>` and rewrite `current.json`, each atomically (rename over the old)."""
        link = self.directory / CURRENT_LINK
        tmp_link = self.directory / f".staging-link-{os.getpid()}-{time.monotonic_ns()}"
        os.symlink(published.directory.name, tmp_link)
        os.replace(tmp_link, link)
        info = {
            "version": published.version,
            "path": str(published.directory),
            "hf_path": str(published.hf_path) if published.hf_path else None,
            "peft_path": str(published.peft_path) if published.peft_path else None,
            "weights_sha256": published.weights_sha256,
            "format": self.config.format,
        }
        _write_json(self.directory / CURRENT_INFO_NAME, info)
        _fsync_directory(self.directory)

    def prune(self) -> list[int]:
        """Remove published versions beyond the newest `keep` (by time of publishing); never the current one."""
        current = os.readlink(self.directory / CURRENT_LINK) if (self.directory / CURRENT_LINK).is_symlink() else None
        versions = []
        for folder in self.directory.iterdir():
            if folder.is_dir() and not folder.is_symlink() and _VERSION_DIR.match(folder.name):
                marker = self._read_marker(folder) or {}
                versions.append((str(marker.get("published_at", "")), folder))
        versions.sort(reverse=True)
        removed = []
        for _, folder in versions[self.config.keep :]:
            if folder.name == current:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(int(folder.name[1:]))
        return removed

    # --- telling the serving engines ------------------------------------------------------------

    def _superseded(self) -> bool:
        with self._cond:
            return self._stopping or self._pending is not None

    def _wait(self, seconds: float) -> bool:
        """Wait before a retry; True when it should stop waiting for good (a newer version, or a stop)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or self._pending is not None, timeout=seconds)
        return self._superseded()

    def _notify(self, target: PublishUrl, published: Published) -> None:
        name = self.config.adapter_name.format(version=published.version)
        path = published.peft_path or published.hf_path or published.directory
        previous = self._loaded.get(target.name)
        values = {
            "name": name,
            "path": str(path),
            "hf_path": str(published.hf_path or ""),
            "peft_path": str(published.peft_path or ""),
            "version": str(published.version),
            "weights_sha256": published.weights_sha256,
            "previous_name": previous.name if previous else "",
            "previous_path": previous.path if previous else "",
            "previous_version": str(previous.version) if previous else "",
        }
        if not self._post(target, target.url, render(target.body, values), published.version, "load"):
            return
        self._loaded[target.name] = _Loaded(name, str(path), published.version)
        if target.unload_url and previous is not None and previous.name != name:
            self._post(target, target.unload_url, render(target.unload_body, values), published.version, "unload")

    def _post(self, target: PublishUrl, url: str, body: Any, version: int, what: str) -> bool:
        """POST with retries (module docstring); True on a 2xx answer. Counts every POST and every failure."""
        delay = self.config.backoff_seconds
        for attempt in range(self.config.retries + 1):
            retry, problem = False, ""
            try:
                response = self._client.post(url, json=body, headers=target.headers)
            except httpx.HTTPError as exc:
                retry, problem = True, f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    with self._cond:
                        self._bump(posts=target.name)
                    log.info("publish: told the serving engine", target=target.name, action=what, version=version, attempt=attempt + 1)
                    return True
                retry = response.status_code == 429 or response.status_code >= 500
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
            with self._cond:
                self._bump(posts=target.name, post_failures=target.name)
            log.warning(
                "publish: POST failed", target=target.name, action=what, version=version, attempt=attempt + 1,
                error=problem, retry=retry and attempt < self.config.retries,
            )
            if not retry or attempt == self.config.retries:
                return False
            if self._wait(delay):
                log.info("publish: POST abandoned for a newer version or a stop", target=target.name, version=version)
                return False
            delay = min(delay * 2, self.config.max_backoff_seconds)
        return False


def _write_json(path: Path, value: Any) -> None:
    """Write JSON to a temporary file beside `path`, sync it and rename it over `path` (readers see old or new)."""
    fd, tmp_name = tempfile.mkstemp(prefix=".staging-json-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(value, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it; put back at once
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
