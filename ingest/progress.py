"""Source cursors: the JSON a source keeps in `sources.cursor`, committed with the records it covers.

Because the cursor changes in the same transaction as the facts and rejections it accounts for,
a process killed at any point resumes exactly where the last commit left off: nothing is read
twice into the ledger and nothing is skipped. A cursor that cannot be read (hand-edited, from an
older version) is treated as empty and logged; the ledger's dedup then absorbs any re-read facts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.orm import Session

from store import intake

logger = logging.getLogger(__name__)


def load_cursor(session: Session, source: str) -> dict[str, Any]:
    """The stored cursor of `source` as a dict ({} when none or unreadable)."""
    row = intake.get_source(session=session, name=source)
    if row is None or not row.cursor:
        return {}
    try:
        value = json.loads(row.cursor)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        logger.warning("source %s: stored cursor is not a JSON object; starting afresh", source)
        return {}
    return value


def dump_cursor(cursor: dict[str, Any]) -> str:
    """The cursor as compact JSON text."""
    return json.dumps(cursor, separators=(",", ":"), sort_keys=True)


def remember(items: list[str], new: list[str], keep: int) -> list[str]:
    """`items` followed by `new`, keeping only the most recent `keep` (oldest dropped first)."""
    present = set(items)
    merged = items + [item for item in new if item not in present]
    return merged[-keep:]
