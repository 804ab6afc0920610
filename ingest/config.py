"""Typed configuration section owned by `ingest/`: the fact sources and the input limits.

`IngestConfig` is the `[ingest]` table of config.toml. Sources are arrays of tables:

    [[ingest.feeds]]
    name = "leaders"
    url = "https://example.org/leaders.atom"
    interval_seconds = 300
    mapping = { mode = "title_regex", pattern = "(?P<subject>.+) is now led by (?P<target_new>.+)",
                prompt_template = "{subject} is led by" }
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MiB = 1024 * 1024


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    return value


class IngestLimits(BaseModel):
    """Bounds on everything read from outside; input beyond them becomes a recorded rejection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_file_bytes: int = Field(
        256 * MiB, ge=1024, le=64 * 1024 * MiB,
        description="Largest drop-folder or local file read (after gzip decompression).",
    )
    max_fetch_bytes: int = Field(
        32 * MiB, ge=1024, le=4 * 1024 * MiB, description="Largest HTTP response body accepted."
    )
    max_line_bytes: int = Field(
        1 * MiB, ge=256, le=256 * MiB, description="Longest JSONL line; longer lines are rejected."
    )
    max_prompt_chars: int = Field(
        2000, ge=16, le=1_000_000, description="Longest prompt (also rephrase and locality prompts)."
    )
    max_target_chars: int = Field(
        500, ge=1, le=1_000_000, description="Longest target_new, ground_truth or locality answer."
    )
    max_list_items: int = Field(
        64, ge=1, le=100_000, description="Most rephrase prompts or locality pairs in one fact."
    )
    max_facts_per_poll: int = Field(
        10_000, ge=1, le=10_000_000,
        description="Most records taken from one network or JSONL source per poll; the rest wait for the next.",
    )
    max_depth: int = Field(
        8, ge=2, le=100, description="Deepest JSON nesting allowed inside one record."
    )


class HttpConfig(BaseModel):
    """The HTTP client used for feeds, web JSON and JSONL URLs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout_seconds: float = Field(5.0, gt=0, le=300, description="Time allowed to connect.")
    read_timeout_seconds: float = Field(15.0, gt=0, le=600, description="Longest wait for the next bytes.")
    total_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="Longest time one fetch may take in all (slow senders are cut off)."
    )
    max_redirects: int = Field(
        3, ge=0, le=20, description="Redirects followed; only to the same host, never to another."
    )
    user_agent: str = Field(
        "lifelong-edit-daemon/0.1 (+ingest)", min_length=1, max_length=200, description="User-Agent header."
    )


PolicyName = Literal["auto", "review", "off"]


class SourceTrust(BaseModel):
    """How far a source is trusted (docs/trust.md): its policy, its rank and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName | None = Field(
        None,
        description="'auto': its valid facts are edited; 'review': they wait for a person's approval "
        "(python -m daemon.ledger review); 'off': they are recorded as rejections, never edited. "
        "Empty: 'review' for anything fetched from a URL, 'auto' for local files, the drop folder and the API.",
    )
    rank: int = Field(
        0, ge=-1_000_000, le=1_000_000,
        description="Trust rank: of two pending facts that disagree on a prompt, the one from the higher rank wins "
        "and the other is held; equal ranks: the newer wins.",
    )
    max_facts_per_hour: int | None = Field(
        None, ge=1, le=100_000_000,
        description="Most facts from this source queued for editing in any hour; more are held and released "
        "when under the limit again. Empty: no limit.",
    )
    max_pending: int | None = Field(
        None, ge=1, le=100_000_000,
        description="Most facts from this source pending or being edited at once; more are held and released "
        "when under the limit again. Empty: no limit.",
    )


class SourceBase(SourceTrust):
    """Fields every polled source has."""

    name: str = Field(
        ..., pattern=SOURCE_NAME_PATTERN, description="Unique name; recorded in the ledger as '<kind>:<name>'."
    )
    interval_seconds: float = Field(300.0, ge=1, le=7 * 86400, description="Time between polls.")
    enabled: bool = Field(True, description="Poll this source.")


class JsonlSource(SourceBase):
    """A JSONL file (local path) or URL read incrementally."""

    location: str = Field(
        ..., min_length=1, max_length=4096,
        description="Local file path, or http(s) URL. Read from the remembered offset / with conditional GET.",
    )

    def is_url(self) -> bool:
        """True when `location` is an http(s) URL rather than a path."""
        return urlsplit(self.location).scheme in ("http", "https")

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme in ("http", "https"):
            return _check_http_url(value)
        if len(scheme) > 1:  # one letter is a Windows drive, anything longer a URL we cannot fetch
            raise ValueError(f"{value!r}: only local paths and http(s) URLs are supported")
        return value


class FeedMapping(BaseModel):
    """How one feed entry becomes a fact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["json", "title_regex"] = Field(
        "json",
        description="'json': the entry's content (or summary) is a JSON fact. "
        "'title_regex': `pattern` is matched against the title and `prompt_template` builds the prompt.",
    )
    pattern: str | None = Field(
        None, max_length=2000,
        description="Regular expression with named groups; `target_new` is required, "
        "`subject` and `ground_truth` are used when present.",
    )
    prompt_template: str | None = Field(
        None, max_length=2000, description="Prompt built from the groups, e.g. '{subject} is led by'."
    )

    @model_validator(mode="after")
    def _check(self) -> FeedMapping:
        if self.mode == "json":
            if self.pattern is not None or self.prompt_template is not None:
                raise ValueError("pattern and prompt_template only apply to mode = 'title_regex'")
            return self
        if not self.pattern or not self.prompt_template:
            raise ValueError("mode 'title_regex' needs both pattern and prompt_template")
        try:
            groups = set(re.compile(self.pattern).groupindex)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        if "target_new" not in groups:
            raise ValueError(f"pattern {self.pattern!r} needs a named group (?P<target_new>...)")
        for literal, field, spec, conversion in string.Formatter().parse(self.prompt_template):
            del literal
            if field is None:
                continue
            if field not in groups or spec or conversion:
                raise ValueError(
                    f"prompt_template {self.prompt_template!r}: '{{{field}}}' must be a plain named group "
                    f"of the pattern (groups: {sorted(groups)})"
                )
        return self


class HttpSourceBase(SourceBase):
    """A source fetched over HTTP."""

    url: str = Field(..., max_length=4096, description="URL (http or https).")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value)


class FeedSource(HttpSourceBase):
    """An RSS 2.0 or Atom feed."""

    mapping: FeedMapping = Field(default_factory=FeedMapping, description="How entries become facts.")  # type: ignore[arg-type]


class WebJsonSource(HttpSourceBase):
    """A web endpoint returning a JSON list of facts or an object `{"facts": [...]}`."""


class IngestConfig(BaseModel):
    """Fact sources polled into the ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop_folder: Path | None = Field(
        None, description="Folder watched for fact files. Empty means `<state_dir>/inbox`."
    )
    drop_folder_enabled: bool = Field(True, description="Scan the drop folder.")
    drop_folder_interval_seconds: float = Field(
        5.0, gt=0, le=86400, description="How often the drop folder is scanned."
    )
    settle_seconds: float = Field(
        2.0, ge=0, le=3600,
        description="A drop-folder file is read once two consecutive scans saw the same size and mtime and the "
        "mtime is at least this old (docs/ingest.md, completeness rule).",
    )
    commit_every: int = Field(
        2000, ge=1, le=1_000_000, description="Records written to the ledger per transaction."
    )
    jitter_seconds: float = Field(
        1.0, ge=0, le=3600, description="Random delay added to each poll so sources do not fire together."
    )
    max_backoff_seconds: float = Field(
        3600.0, ge=1, le=7 * 86400,
        description="Longest pause after repeated failures (the pause doubles per failure up to this).",
    )
    unhealthy_after_failures: int = Field(
        3, ge=1, le=1000, description="Consecutive failed polls after which a source is reported unhealthy."
    )
    drop_folder_trust: SourceTrust = Field(
        default_factory=SourceTrust,  # type: ignore[arg-type]
        description="Trust of the drop folder (policy, rank, max_facts_per_hour, max_pending); policy 'auto' "
        "unless set (docs/trust.md).",
    )
    api_trust: SourceTrust = Field(
        default_factory=SourceTrust,  # type: ignore[arg-type]
        description="Trust of POST /v1/facts (behind the write token); policy 'auto' unless set (docs/trust.md).",
    )
    cli_trust: SourceTrust = Field(
        default_factory=SourceTrust,  # type: ignore[arg-type]
        description="Trust of `python -m ingest FILE_OR_URL` imports; unless set, policy 'auto' for files and "
        "'review' for http(s) URLs (docs/trust.md).",
    )
    protected_facts: Path | None = Field(
        None,
        description="JSONL file of protected facts, one {\"prompt\": ..., \"answer\": ...} a line: the gate rejects an "
        "edit that changes the model's answer to one, and a new fact with a protected prompt waits for review "
        "(docs/trust.md). Relative paths are relative to the working directory.",
    )
    limits: IngestLimits = Field(default_factory=IngestLimits, description="Input limits.")  # type: ignore[arg-type]
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP client.")  # type: ignore[arg-type]
    jsonl: tuple[JsonlSource, ...] = Field(
        (),
        description="JSONL files or URLs read incrementally: [[ingest.jsonl]] tables with name, location, "
        "interval_seconds, enabled (docs/ingest.md).",
    )
    feeds: tuple[FeedSource, ...] = Field(
        (),
        description="RSS 2.0 / Atom feeds: [[ingest.feeds]] tables with name, url, interval_seconds, enabled and "
        "mapping = {mode = 'json'} or {mode = 'title_regex', pattern, prompt_template} (docs/ingest.md).",
    )
    web: tuple[WebJsonSource, ...] = Field(
        (),
        description="Web JSON endpoints returning [...] or {\"facts\": [...]}: [[ingest.web]] tables with name, url, "
        "interval_seconds, enabled (docs/ingest.md).",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> IngestConfig:
        for kind, sources in (("jsonl", self.jsonl), ("feeds", self.feeds), ("web", self.web)):
            names = [s.name for s in sources]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"ingest.{kind}: source names must be unique; repeated: {duplicates}")
        return self
