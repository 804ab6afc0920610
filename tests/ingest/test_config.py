"""The ingest configuration section: sources from config.toml, and the checks that reject bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.config import ConfigError, load_settings
from ingest.config import FeedMapping, FeedSource, IngestConfig, JsonlSource, WebJsonSource

TOML = """
[ingest]
drop_folder = "/srv/inbox"
commit_every = 500

[ingest.limits]
max_facts_per_poll = 100

[[ingest.jsonl]]
name = "stream"
location = "/var/log/facts.jsonl"

[[ingest.feeds]]
name = "leaders"
url = "https://example.org/leaders.atom"
interval_seconds = 600
mapping = { mode = "title_regex", pattern = "(?P<subject>.+) is now led by (?P<target_new>.+)", prompt_template = "{subject} is led by" }

[[ingest.web]]
name = "api"
url = "http://127.0.0.1:9000/facts"
"""


def test_sources_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(TOML)
    settings = load_settings(path, state_dir=tmp_path)
    ingest = settings.ingest
    assert settings.drop_folder() == Path("/srv/inbox") and ingest.commit_every == 500
    assert ingest.limits.max_facts_per_poll == 100
    assert [s.name for s in ingest.jsonl] == ["stream"] and not ingest.jsonl[0].is_url()
    assert ingest.feeds[0].mapping.mode == "title_regex" and ingest.feeds[0].interval_seconds == 600
    assert ingest.web[0].url == "http://127.0.0.1:9000/facts"


def test_bad_source_in_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[ingest.web]]\nname = "api"\nurl = "ftp://example.org/x"\n')
    with pytest.raises(ConfigError, match=r"ingest\.web\.0\.url"):
        load_settings(path, state_dir=tmp_path)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"mode": "title_regex", "pattern": "(?P<target_new>.+"}, "needs both pattern and prompt_template"),
        ({"mode": "title_regex", "pattern": "(?P<target_new>.+", "prompt_template": "x"}, "not a valid regular"),
        ({"mode": "title_regex", "pattern": "(?P<subject>.+)", "prompt_template": "{subject}"},
         "needs a named group \\(\\?P<target_new>"),
        ({"mode": "title_regex", "pattern": "(?P<target_new>.+)", "prompt_template": "{subject} is"},
         "'{subject}' must be a plain named group"),
        ({"mode": "title_regex", "pattern": "(?P<target_new>.+)", "prompt_template": "{target_new.__class__}"},
         "must be a plain named group"),
        ({"mode": "title_regex", "pattern": "(?P<target_new>.+)", "prompt_template": "{target_new!r}"},
         "must be a plain named group"),
        ({"mode": "json", "pattern": "x"}, "only apply to mode = 'title_regex'"),
    ],
)
def test_feed_mapping_checks(mapping: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FeedMapping(**mapping)  # type: ignore[arg-type]


def test_urls_names_and_duplicates() -> None:
    with pytest.raises(ValidationError, match="not an http:// or https:// URL"):
        FeedSource(name="f", url="file:///etc/passwd")
    with pytest.raises(ValidationError, match="only local paths and http"):
        JsonlSource(name="j", location="ftp://example.org/x.jsonl")
    with pytest.raises(ValidationError, match="String should match pattern"):
        WebJsonSource(name="../escape", url="http://127.0.0.1/x")
    with pytest.raises(ValidationError, match="source names must be unique; repeated: \\['a'\\]"):
        IngestConfig(web=[{"name": "a", "url": "http://h/1"}, {"name": "a", "url": "http://h/2"}])  # type: ignore[list-item]
    assert JsonlSource(name="j", location="https://h/x.jsonl").is_url()
