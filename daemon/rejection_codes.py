"""Rejection reasons (free text) mapped to a small, fixed set of codes for metric labels.

Ingest writes precise reasons such as ``target_new: is 812 characters; the limit is 500``. They
name fields and quote values, so as label values they would make a new time series for almost
every rejection. `reason_code` keeps the label set bounded: the first rule whose pattern occurs in
the reason (case-insensitive) gives the code, and anything unrecognised is ``other``. The full
reason stays in the ledger (`python -m daemon.ledger`) and the logs.
"""

from __future__ import annotations

import re

#: (code, pattern) in the order they are tried; the first match wins.
RULES: tuple[tuple[str, str], ...] = (
    ("unreadable_input", r"cannot read|not a regular file|unsupported file type|fetch|http status"),
    ("too_large", r"larger than|longer than the limit|the limit is|decompresses to more than"),
    ("invalid_encoding", r"not valid utf-8|nul byte|unpaired surrogate"),
    ("invalid_json", r"invalid json|not valid json|nested too deeply|expected a json list"),
    ("bad_compression", r"gzip"),
    ("bad_feed", r"malformed xml|not an rss or atom feed|feed's pattern|prompt_template|unsafe markup|\bfeed:"),
    ("no_records", r"contains no records"),
    ("missing_field", r"\brequired\b|must be given together"),
    ("unknown_field", r"unknown field"),
    ("empty_text", r"must not be empty"),
    ("control_character", r"control character"),
    ("bad_timestamp", r"iso 8601|has no timezone"),
    ("same_as_ground_truth", r"equals ground_truth|nothing to edit"),
    ("wrong_type", r"should be a valid|must be a|must be an|expected a json object|input should be"),
)

#: Every code `reason_code` can return, ``other`` last.
REASON_CODES: tuple[str, ...] = (*(code for code, _ in RULES), "other")

_COMPILED = tuple((code, re.compile(pattern, re.IGNORECASE)) for code, pattern in RULES)


def reason_code(reason: str) -> str:
    """The bounded code of a free-text rejection reason (one of `REASON_CODES`)."""
    for code, pattern in _COMPILED:
        if pattern.search(reason):
            return code
    return "other"
