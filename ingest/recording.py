"""Writing outcomes into the ledger, and the tally of what happened.

`record_outcomes` stores the facts and rejections of one batch inside the caller's transaction
(it never commits), so a source can commit its records and its new cursor as one unit. With trust
rules (`ingest.trust.trust_rules`) the facts of a source whose policy is `off` are recorded as
rejections saying so, and the ledger holds the facts the rules hold (docs/trust.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from ingest.facts import Accepted, Outcome
from store import intake
from store.records import RejectionIn
from store.trust import Policy, TrustRules


@dataclass
class Tally:
    """Counts for one or more batches, and every rejection (for reports and the CLI summary)."""

    accepted: int = 0
    duplicates: int = 0
    superseded: int = 0
    held: int = 0  #: of the accepted facts, how many wait in the review queue or for their source's limits
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
        self.held += other.held
        self.rejections.extend(other.rejections)


def split(outcomes: Sequence[Outcome]) -> tuple[list[Accepted], list[RejectionIn]]:
    """The accepted facts and the rejections of `outcomes`, each in input order."""
    accepted = [o for o in outcomes if isinstance(o, Accepted)]
    rejected = [o for o in outcomes if isinstance(o, RejectionIn)]
    return accepted, rejected


def switched_off(accepted: Sequence[Accepted], rules: TrustRules | None) -> tuple[list[Accepted], list[RejectionIn]]:
    """The facts to store, and the rejections of those whose source's policy is `off`."""
    if rules is None:
        return list(accepted), []
    kept, off = [], []
    for item in accepted:
        if rules.rule(item.origin.source).policy is Policy.OFF:
            excerpt = json.dumps({"prompt": item.fact.prompt, "target_new": item.fact.target_new}, ensure_ascii=False)
            reason = f"source {item.origin.source} has policy off: its facts are not edited (docs/trust.md)"
            off.append(RejectionIn(item.origin, excerpt[:500], reason))
        else:
            kept.append(item)
    return kept, off


def record_outcomes(session: Session, outcomes: Sequence[Outcome], rules: TrustRules | None = None) -> Tally:
    """Store `outcomes` (facts with their origins, and rejections) in the caller's transaction, under `rules`."""
    accepted, rejected = split(outcomes)
    accepted, off = switched_off(accepted, rules)
    rejected = rejected + off
    tally = Tally(rejections=rejected)
    if accepted:
        result = intake.add_facts(session=session, items=[(a.fact, a.origin) for a in accepted], rules=rules)
        tally.accepted, tally.duplicates, tally.superseded = result.accepted, result.duplicates, result.superseded
        tally.held = result.held
    if rejected:
        intake.add_rejections(session=session, items=rejected)
    return tally
