"""The trust rules of the configured sources, and the protected-facts file (docs/trust.md).

`trust_rules(config)` turns `[ingest]` into the ledger's `store.trust.TrustRules`: each configured
source's policy (unset: `review` for anything fetched from a URL, `auto` for local files, the drop
folder, the API and the command line), rank and limits, keyed by its ledger name, and the prompts of
the protected facts. `load_protected(path)` reads the protected-facts file: JSONL, one
`{"prompt": ..., "answer": ...}` object a line (blank lines and lines starting with `#` are skipped);
anything else is a `ProtectedFactsError` naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ingest.config import IngestConfig, SourceTrust
from ingest.errors import IngestError
from ingest.polling import ledger_name
from store.normalise import hash_normalised, normalise_text
from store.trust import Policy, SourceRule, TrustRules

#: Ledger names of the sources that are not configured as tables (ingest/dropfolder.py, daemon API, ingest CLI).
DROP_FOLDER_SOURCE, API_SOURCE, CLI_SOURCE = "inbox", "api", "cli"
#: Most protected facts read from the file; the gate checks every one on every batch.
MAX_PROTECTED = 10_000
MAX_PROTECTED_CHARS = 2000


class ProtectedFactsError(IngestError):
    """The protected-facts file cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class ProtectedFact:
    """A prompt whose answer must not change, as the operator wrote it, and where."""

    prompt: str
    answer: str
    line: int

    def describe(self, path: Path) -> str:
        return f"{self.prompt!r} -> {self.answer!r}, {path} line {self.line}"


def load_protected(path: Path) -> tuple[ProtectedFact, ...]:
    """The protected facts of `path` (module docstring for the format); ProtectedFactsError naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtectedFactsError(f"protected facts file {path}: cannot read it: {exc}") from None
    facts: list[ProtectedFact] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"protected facts file {path} line {number}"
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ProtectedFactsError(f"{where}: not a JSON object: {exc.msg} at column {exc.colno}") from None
        if not isinstance(record, dict) or set(record) != {"prompt", "answer"}:
            raise ProtectedFactsError(f'{where}: expected {{"prompt": "...", "answer": "..."}} and nothing else')
        prompt, answer = record["prompt"], record["answer"]
        for name, value in (("prompt", prompt), ("answer", answer)):
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROTECTED_CHARS:
                raise ProtectedFactsError(f"{where}: {name} must be text of 1 to {MAX_PROTECTED_CHARS} characters")
        key = normalise_text(prompt)
        if key in seen:
            raise ProtectedFactsError(f"{where}: the prompt {prompt!r} is protected already on line {seen[key]}")
        seen[key] = number
        facts.append(ProtectedFact(prompt.strip(), answer.strip(), number))
        if len(facts) > MAX_PROTECTED:
            raise ProtectedFactsError(f"{where}: more than {MAX_PROTECTED} protected facts")
    return tuple(facts)


def configured_protected(config: IngestConfig) -> tuple[ProtectedFact, ...]:
    """The protected facts of `[ingest] protected_facts` (none when unset)."""
    return load_protected(config.protected_facts) if config.protected_facts is not None else ()


def _rule(trust: SourceTrust, *, fetched: bool) -> SourceRule:
    policy = Policy(trust.policy) if trust.policy is not None else (Policy.REVIEW if fetched else Policy.AUTO)
    return SourceRule(policy, trust.rank, trust.max_facts_per_hour, trust.max_pending)


def source_rules(config: IngestConfig) -> dict[str, SourceRule]:
    """Every configured source's rule by ledger name (the same names `ingest.scheduling` polls under)."""
    from ingest import jsonl, rss, web  # the source modules import this one (their polls apply the rules)

    rules = {
        DROP_FOLDER_SOURCE: _rule(config.drop_folder_trust, fetched=False),
        API_SOURCE: _rule(config.api_trust, fetched=False),
        CLI_SOURCE: _rule(config.cli_trust, fetched=False),
    }
    for source in config.jsonl:
        rules[ledger_name(jsonl.KIND, source.name)] = _rule(source, fetched=source.is_url())
    for feed in config.feeds:
        rules[ledger_name(rss.KIND, feed.name)] = _rule(feed, fetched=True)
    for endpoint in config.web:
        rules[ledger_name(web.KIND, endpoint.name)] = _rule(endpoint, fetched=True)
    return rules


def polled_rules(config: IngestConfig, name: str, source: SourceTrust, *, fetched: bool) -> TrustRules:
    """The rules of `config`, with the source being polled (ledger `name`) as given, configured or not."""
    rules = trust_rules(config)
    return TrustRules({**rules.sources, name: _rule(source, fetched=fetched)}, rules.default, rules.protected)


def trust_rules(config: IngestConfig, protected: tuple[ProtectedFact, ...] | None = None) -> TrustRules:
    """The ledger's rules for `config`; `protected` defaults to reading `[ingest] protected_facts` now.

    Sources the configuration does not name (facts recorded under another name) get `auto`, rank 0.
    Raises ProtectedFactsError for a bad protected-facts file.
    """
    facts = configured_protected(config) if protected is None else protected
    path = config.protected_facts or Path("protected facts")
    hashes = {hash_normalised(normalise_text(f.prompt), f.answer)[1]: f.describe(path) for f in facts}
    return TrustRules(sources=source_rules(config), protected=hashes)
