"""Writing outcomes into the ledger, and the tally of what happened.

`record_outcomes` stores the facts and rejections of one batch inside the caller's transaction
(it never commits), so a source can commit its records and its new cursor as one unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from ingest.facts import Accepted, Outcome
from store import intake
from store.records import RejectionIn


@dataclass
class Tally:
    """Counts for one or more batches, and every rejection (for reports and the CLI summary)."""

    accepted: int = 0
    duplicates: int = 0
    superseded: int = 0
    rejections: list[RejectionIn] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        """How many records became rejections."""
        return len(self.rejections)

    def add(self, other: Tally) -> None:
        """Add `other`'s counts and rejections to this tally."""
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.superseded += other.superseded
        self.rejections.extend(other.rejections)


def split(outcomes: Sequence[Outcome]) -> tuple[list[Accepted], list[RejectionIn]]:
    """The accepted facts and the rejections of `outcomes`, each in input order."""
    accepted = [o for o in outcomes if isinstance(o, Accepted)]
    rejected = [o for o in outcomes if isinstance(o, RejectionIn)]
    return accepted, rejected


def record_outcomes(session: Session, outcomes: Sequence[Outcome]) -> Tally:
    """Store `outcomes` (facts with their origins, and rejections) in the caller's transaction."""
    accepted, rejected = split(outcomes)
    tally = Tally(rejections=rejected)
    if accepted:
        result = intake.add_facts(session=session, items=[(a.fact, a.origin) for a in accepted])
        tally.accepted, tally.duplicates, tally.superseded = result.accepted, result.duplicates, result.superseded
    if rejected:
        intake.add_rejections(session=session, items=rejected)
    return tally
