"""Ledger functions of editing pauses: when the daemon stopped editing, why, and what ended it.

The daemon pauses editing when going on would only make things worse (drift past the probes'
thresholds, a gate that finds the live model already beyond its budget, a revert it could not
apply). A pause is in force while its row has no `resumed_at`, so it outlives restarts; a revert or
an operator's resume ends it. Like the rest of the ledger API these take a keyword-only `session`
and never commit.
"""

from __future__ import annotations

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from store.models import Pause, Revert, utc_now


def current_pause(session: Session) -> Pause | None:
    """The pause in force (the newest one not resumed), or None while editing runs."""
    query = select(Pause).where(Pause.resumed_at.is_(None)).order_by(Pause.id.desc()).limit(1)
    return session.scalars(query).first()


def record_pause(*, session: Session, reason: str, version: int, config_hash: str | None) -> Pause:
    """Record that editing paused at live `version` for `reason`; a pause in force for the same reason is kept."""
    current = current_pause(session)
    if current is not None and current.reason == reason:
        return current
    pause = Pause(reason=reason, version=version, config_hash=config_hash)
    session.add(pause)
    session.flush()
    return pause


def record_resume(*, session: Session, resumed_by: str) -> int:
    """End every pause in force, saying what ended it ("revert 7", "api:10.0.0.1"); returns how many there were."""
    result = session.execute(
        update(Pause).where(Pause.resumed_at.is_(None)).values(resumed_at=utc_now(), resumed_by=resumed_by)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def revert_since(session: Session, pause: Pause) -> Revert | None:
    """The newest revert filed, or carried out on the weights, after `pause` began (an answer to it), or None.

    Carried out counts too: a revert that could not be applied (the pause's reason) is applied by
    recovery at the next start.
    """
    since = or_(Revert.requested_at > pause.paused_at, Revert.weights_restored_at > pause.paused_at)
    return session.scalars(select(Revert).where(since).order_by(Revert.id.desc()).limit(1)).first()
