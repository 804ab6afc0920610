"""Configuration: file, environment and command-line precedence, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import (
    ConfigError,
    Settings,
    iter_keys,
    load_settings,
    reference_markdown,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("KED_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./config.toml unless a test writes one


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    settings = load_settings()
    assert settings.model.source == "default"
    assert settings.editor.steps == 2
    assert settings.state_dir == Path("state")
    assert settings.ledger_url().endswith("state/ledger.sqlite3")
    assert settings.drop_folder() == Path("state/inbox")


def test_file_then_environment_then_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'state_dir = "from-file"\n[model]\ndevice = "cpu"\ndtype = "bfloat16"\n')
    settings = load_settings(path)
    assert (settings.model.device, settings.model.dtype, settings.state_dir) == ("cpu", "bfloat16", Path("from-file"))

    monkeypatch.setenv("KED_MODEL__DTYPE", "float16")
    monkeypatch.setenv("KED_STATE_DIR", "from-env")
    settings = load_settings(path)
    assert settings.model.dtype == "float16"
    assert settings.model.device == "cpu"  # the file's value survives beside the env override
    assert settings.state_dir == Path("from-env")

    settings = load_settings(path, state_dir=Path("from-cli"))
    assert settings.state_dir == Path("from-cli")


def test_environment_lists_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KED_MODEL__EDIT_MODULES", '["model.layers.1.mlp.up_proj"]')
    assert load_settings().model.edit_modules == ["model.layers.1.mlp.up_proj"]


def test_default_config_file_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[editor]\nsteps = 3\n")
    assert load_settings().editor.steps == 3


def test_bad_value_names_key_value_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\ndevice = "gpu"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "model.device" in message
    assert "'gpu'" in message
    assert "'cpu'" in message and "'cuda'" in message and "'auto'" in message
    assert str(path) in message


def test_bad_environment_value_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KED_EDITOR__STEPS", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "editor.steps" in message and "'0'" in message and "greater than or equal to 1" in message
    assert "KED_EDITOR__STEPS" in message


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\ndevise = 'cpu'\n")
    with pytest.raises(ConfigError, match=r"model\.devise: unknown key"):
        load_settings(path)


def test_missing_file_and_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(write(tmp_path, "[model\n"))


def test_every_key_has_a_description() -> None:
    missing = [key for key, _, _, description in iter_keys(Settings) if not description.strip()]
    assert missing == []


def test_reference_page_is_in_step_with_the_settings() -> None:
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert page == reference_markdown(), "regenerate: python -m daemon.config --reference > docs/configuration.md"


def test_shipped_config_file_is_valid() -> None:
    settings = load_settings(REPO_ROOT / "config.toml")
    assert settings.model.source == "default"
