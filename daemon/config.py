"""Process settings: `config.toml` plus environment overrides, assembled once at the entry point.

Precedence, highest first: command-line options (`--state-dir`), environment variables, the TOML
file, the defaults below. Environment variables use the prefix ``KED_`` and ``__`` between nested
keys: ``KED_MODEL__DEVICE=cuda`` sets ``[model] device``; ``KED_STATE_DIR=/var/lib/ked`` sets the
top-level ``state_dir``. List and table values are given as JSON
(``KED_MODEL__EDIT_MODULES='["model.layers.4.mlp.up_proj"]'``).

Nothing here runs at import time: `load_settings` builds the settings when an entry point calls it
(through `daemon.bootstrap.command_settings`, which every command-line tool uses). The reference page
`docs/configuration.md` is generated from these classes by ``python -m daemon.config --reference``
(`daemon.commands.config`) and a test keeps it in step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon.publishing import PublishConfig
from editing.config import EditorConfig, ModelConfig
from editing.gate.config import GateConfig
from ingest.config import IngestConfig
from store.config import StoreConfig

ENV_PREFIX = "KED_"
ENV_NESTED_DELIMITER = "__"
DEFAULT_CONFIG_FILE = Path("config.toml")


class ApiConfig(BaseModel):
    """The HTTP API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Serve the HTTP API.")
    host: str = Field(
        "127.0.0.1", description="Address to bind. Write endpoints on a non-loopback address need `token`."
    )
    port: int = Field(8470, ge=0, le=65535, description="TCP port (0 picks a free one).")
    token: str | None = Field(
        None,
        description="Bearer token required by the write endpoints (POST /v1/facts, POST /v1/revert); "
        "set it through KED_API__TOKEN rather than the file.",
    )
    read_token: str | None = Field(
        None,
        pattern=r"\S",
        description="Bearer token required, when set, to read the model: POST /v1/query and the OpenAI routes "
        "(/v1/models, /v1/chat/completions, /v1/completions); the write token is accepted too. "
        "Set it through KED_API__READ_TOKEN rather than the file.",
    )
    write_enabled: bool = Field(
        True, description="Serve the write endpoints; when false they are absent from the API and its schema."
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="Largest request body accepted; larger ones get 413.",
    )
    max_facts_per_request: int = Field(
        1000, ge=1, le=1_000_000, description="Most records in one POST /v1/facts; more get 422."
    )
    max_new_tokens: int = Field(
        128, ge=1, le=4096,
        description="Most tokens one POST /v1/query, or one chat or text completion, may ask the model to generate "
        "(and the budget of a chat completion that gives none).",
    )
    rate_limit_per_second: float = Field(
        20.0, gt=0, le=1_000_000, description="Requests per second allowed to one client address (token bucket)."
    )
    rate_limit_burst: int = Field(
        40, ge=1, le=1_000_000, description="Requests one client may make at once before the rate limit applies."
    )
    max_concurrent_requests: int = Field(
        64, ge=1, le=100_000, description="Requests handled at once; beyond it the server answers 503."
    )
    shutdown_timeout_seconds: float = Field(
        5.0, gt=0, le=600, description="How long a stop waits for in-flight requests before closing connections."
    )


class EditLoopConfig(BaseModel):
    """The edit loop: when pending facts become an edit batch, and first-run training of the editor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Edit pending facts into the model. False: ingest and serve only.")
    min_batch: int = Field(
        16,
        ge=1,
        le=4096,
        description="M: edit as soon as this many facts are pending (a batch takes up to [editor] batch_size).",
    )
    max_wait_seconds: float = Field(
        30.0,
        ge=0.0,
        le=86400.0,
        description="T: edit fewer than `min_batch` facts once the oldest pending one has waited this long.",
    )
    poll_seconds: float = Field(
        1.0, gt=0.0, le=3600.0, description="How often the loop looks for work (pending facts, revert requests)."
    )
    train_if_missing: bool = Field(
        True,
        description="When no trained editor exists for the model, train one at start-up (editing waits for it). "
        "False: stay unready until `python -m editing.train` has written one.",
    )
    training_data: str = Field(
        "synthetic:1000",
        description="Data for first-run training: synthetic:N (built-in counterfactual facts), zsre:PATH, "
        "counterfact:PATH or examples:PATH.",
    )
    training_batches: int = Field(
        32, ge=1, le=100000, description="Training edit batches of first-run training ([editor] batch_size facts each)."
    )
    stop_timeout_seconds: float = Field(
        60.0,
        gt=0.0,
        le=3600.0,
        description="On stop, how long to wait for the in-flight batch to finish or roll back before exiting anyway "
        "(nothing is lost: an unfinished batch goes back to pending at the next start).",
    )


class MetricsConfig(BaseModel):
    """Prometheus metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Expose Prometheus metrics at /metrics on the API port.")
    recent_commits: int = Field(
        20, ge=1, le=10_000,
        description="How many of the newest commits the ked_recent_commits_*_ratio gauges average over.",
    )


class LoggingConfig(BaseModel):
    """Structured logging to standard output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest level written.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="'auto': readable lines on a terminal, JSON lines otherwise."
    )
    library_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Level for third-party loggers (transformers, sqlalchemy, apscheduler, uvicorn)."
    )


class Settings(BaseSettings):
    """Everything the daemon and its command-line tools are configured with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    state_dir: Path = Field(
        Path("state"),
        description="Where state lives: the SQLite ledger, artefacts, the trained editor and the drop folder by default.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The language model.")  # type: ignore[arg-type]
    editor: EditorConfig = Field(default_factory=EditorConfig, description="The EMSEdit editor.")  # type: ignore[arg-type]
    gate: GateConfig = Field(default_factory=GateConfig, description="The commit gate.")  # type: ignore[arg-type]
    edit_loop: EditLoopConfig = Field(default_factory=EditLoopConfig, description="The edit loop.")  # type: ignore[arg-type]
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Fact sources.")  # type: ignore[arg-type]
    store: StoreConfig = Field(default_factory=StoreConfig, description="The edit ledger.")  # type: ignore[arg-type]
    api: ApiConfig = Field(default_factory=ApiConfig, description="The HTTP API.")  # type: ignore[arg-type]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics.")  # type: ignore[arg-type]
    publish: PublishConfig = Field(
        default_factory=PublishConfig,  # type: ignore[arg-type]
        description="Publishing each version for serving engines (docs/serving.md).",
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")  # type: ignore[arg-type]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file comes after the environment so that KED_* variables override it.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    # Derived paths: one function per path, so no caller builds them by hand.
    def ledger_url(self) -> str:
        """The SQLAlchemy URL of the ledger: `store.url`, or SQLite in the state directory."""
        if self.store.url:
            return self.store.url
        return f"sqlite:///{(self.state_dir / 'ledger.sqlite3').resolve()}"

    def drop_folder(self) -> Path:
        """The drop folder: `ingest.drop_folder`, or `<state_dir>/inbox`."""
        return self.ingest.drop_folder or self.state_dir / "inbox"

    def editor_checkpoint(self) -> Path:
        """The trained editor's directory: `editor.checkpoint`, or `<state_dir>/editor`."""
        return self.editor.checkpoint or self.state_dir / "editor"

    def model_cache_dir(self) -> Path:
        """Where de-quantised GGUF models are cached: `model.cache_dir`, or `<state_dir>/model-cache`."""
        return self.model.cache_dir or self.state_dir / "model-cache"

    def artefact_dir(self) -> Path:
        """Where commit artefacts (weight deltas, snapshots) are written."""
        return self.state_dir / "artefacts"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names every bad key, its value and what is allowed."""


def _format_error(err: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in err["loc"])
    env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part).upper() for part in err["loc"])
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (given {given!r}); remove it or check its spelling"
    return f"{key}: got {given!r}; allowed: {err['msg']} (set in the config file or {env_name})"


def load_settings(config_file: Path | None = None, *, state_dir: Path | None = None) -> Settings:
    """Build the settings from `config_file` (default: ./config.toml if present) and the environment.

    Raises ConfigError naming each invalid key, the value given and what is allowed.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {str(config_file)!r} does not exist or is not a file")
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE

    class _BoundSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    overrides: dict[str, Any] = {}
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    try:
        return _BoundSettings(**overrides)
    except ValidationError as exc:
        lines = [_format_error(dict(e)) for e in exc.errors()]
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(lines)) from None
    except (OSError, ValueError) as exc:  # e.g. TOML syntax errors
        raise ConfigError(f"cannot read configuration {config_file}: {exc}") from None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and `--state-dir`, which every command-line entry point takes."""
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file (default: ./config.toml)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where state lives (overrides state_dir)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load the settings named by the `--config` / `--state-dir` arguments."""
    return load_settings(args.config, state_dir=args.state_dir)


# --- reference documentation -------------------------------------------------------------------


def iter_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, str, str]]:
    """Yield (dotted key, default, type, description) for every leaf key of a settings class."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_keys(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        yield f"{prefix}{name}", default, _type_name(annotation), field.description or ""


def _type_name(annotation: Any) -> str:
    """A readable type: Literal values spelled out, Optional as `| None`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(value) for value in get_args(annotation))
    if origin in (Union, UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is not None:
        inner = ", ".join(_type_name(arg) for arg in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return str(getattr(annotation, "__name__", annotation)).replace("typing.", "")


def reference_markdown() -> str:
    """The configuration reference page, generated from the settings classes."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m daemon.config --reference > docs/configuration.md`; a test fails when it is stale.",
        "",
        f"Every key can be set in `config.toml` (section `[model]` for `model.*` and so on) or in the "
        f"environment with the prefix `{ENV_PREFIX}` and `{ENV_NESTED_DELIMITER}` between levels: "
        f"`model.device` is `{ENV_PREFIX}MODEL{ENV_NESTED_DELIMITER}DEVICE`. Lists and tables are JSON in the "
        "environment. The environment wins over the file; `--state-dir` wins over both.",
        "",
    ]
    section = None
    for key, default, type_name, description in iter_keys(Settings):
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            section = head
            out += [
                "",
                f"## {section}",
                "",
                "| key | type | default | environment | description |",
                "|---|---|---|---|---|",
            ]
        env = ENV_PREFIX + ENV_NESTED_DELIMITER.join(part.upper() for part in key.split("."))
        shown = "" if default is None else repr(str(default) if isinstance(default, Path) else default)
        cells = [
            f"`{key}`",
            type_name.replace("|", "\\|"),
            f"`{shown}`" if shown else "(empty)",
            f"`{env}`",
            description,
        ]
        out.append("| " + " | ".join(c.replace("\n", " ") for c in cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    # `python -m daemon.config` keeps its name; the command starts like the others, in daemon.commands.config.
    from daemon.commands.config import main

    sys.exit(main())
