"""The fact state machine: the legal status changes and `transition`, the one function that makes them.

Legal edges (docs/ledger.md draws them):

    pending    -> editing      claimed by the edit loop (attempts + 1)
    pending    -> superseded   a newer target for the same prompt arrived before this one was edited
    editing    -> committed    applied by a commit (commit_version set)
    editing    -> rejected     the gate refused the edit (last_error and failure_cause set)
    editing    -> failed       the edit loop gave up on it (last_error and failure_cause set)
    editing    -> pending      recovery: the process stopped while the fact was claimed
    committed  -> reverted     its commit was reverted
    committed  -> superseded   a newer target for the same prompt was committed
    superseded -> committed    revert: the fact that superseded it was reverted, its own commit stays
    superseded -> reverted     revert: its own commit was reverted after it had been superseded
    rejected | failed | reverted -> pending   explicit requeue only
    pending    -> held         a pending fact from a more trusted source disagrees on the same prompt
    held       -> pending      approved by a reviewer, or released by the daemon when its source is under its limits
    held       -> rejected     rejected by a reviewer (last_error says who and why)

Facts enter `held` at intake too (docs/trust.md), as a new row rather than a status change.

Everything else raises IllegalTransition and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.errors import IllegalTransition, LedgerError, UnknownFact
from store.models import Fact, FactStatus, FailureCause, HoldReason, utc_now

S = FactStatus

LEGAL_TRANSITIONS: frozenset[tuple[FactStatus, FactStatus]] = frozenset(
    {
        (S.PENDING, S.EDITING),
        (S.PENDING, S.SUPERSEDED),
        (S.EDITING, S.COMMITTED),
        (S.EDITING, S.REJECTED),
        (S.EDITING, S.FAILED),
        (S.EDITING, S.PENDING),
        (S.COMMITTED, S.REVERTED),
        (S.COMMITTED, S.SUPERSEDED),
        (S.SUPERSEDED, S.COMMITTED),
        (S.SUPERSEDED, S.REVERTED),
        (S.REJECTED, S.PENDING),
        (S.FAILED, S.PENDING),
        (S.REVERTED, S.PENDING),
        (S.PENDING, S.HELD),
        (S.HELD, S.PENDING),
        (S.HELD, S.REJECTED),
    }
)

#: Rows per IN (...) list: well under SQLite's bound-parameter limit, and cheap for Postgres to plan.
CHUNK = 500


def is_legal(current: FactStatus, to: FactStatus) -> bool:
    """True when the state machine allows `current -> to`."""
    return (current, to) in LEGAL_TRANSITIONS


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """`values` cut into consecutive slices of at most `size`."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def transition(
    *,
    session: Session,
    fact_ids: Sequence[int],
    to: FactStatus,
    error: str | None = None,
    superseded_by: int | None = None,
    commit_version: int | None = None,
    failure_cause: FailureCause | None = None,
    hold_reason: HoldReason | None = None,
) -> int:
    """Move every fact in `fact_ids` to status `to`; all or none. Returns the number of facts moved.

    Side effects by target: `editing` counts an attempt; `rejected`/`failed` store `error` as
    `last_error` (required); `superseded` records `superseded_by` (required); `committed` from
    `editing` records `commit_version` (required), and from `superseded` clears `superseded_by`;
    `pending` clears `commit_version` (commit_facts keeps the history); `held` stores `hold_reason`
    (required) and `error` as `last_error` (required); leaving `held` clears `hold_reason`, and going
    from `held` to `pending` stamps `queued_at` and clears `last_error`. Wherever `error` is stored,
    `failure_cause` is stored with it (None when not given), so the two always describe the same try.
    Raises UnknownFact for an id not in the ledger and IllegalTransition (naming each fact and its
    current status) if any move is not in LEGAL_TRANSITIONS. Rows are locked (FOR UPDATE on
    Postgres; SQLite's immediate transaction holds the write lock) so the check cannot go stale.
    Does not commit.
    """
    ids = list(dict.fromkeys(fact_ids))
    if not ids:
        return 0
    _check_arguments(to, error, superseded_by, commit_version, hold_reason)
    current = _lock_statuses(session, ids)
    illegal = [f"fact {fid} is {current[fid].value}" for fid in ids if not is_legal(current[fid], to)]
    if illegal:
        shown = "; ".join(illegal[:10]) + (f"; and {len(illegal) - 10} more" if len(illegal) > 10 else "")
        raise IllegalTransition(f"cannot move to {to.value}: {shown} (see docs/ledger.md, 'State machine')")
    by_origin: dict[FactStatus, list[int]] = {}
    for fid in ids:
        by_origin.setdefault(current[fid], []).append(fid)
    for origin, group in by_origin.items():
        values = _values(origin, to, error, superseded_by, commit_version, failure_cause, hold_reason)
        for part in chunks(group):
            session.execute(
                update(Fact).where(Fact.id.in_(part)).values(status=to, status_changed_at=utc_now(), **values),
                execution_options={"synchronize_session": False},
            )
    _refresh_loaded(session, ids)
    return len(ids)


def transition_if(
    *,
    session: Session,
    fact_ids: Sequence[int],
    current: FactStatus,
    to: FactStatus,
    error: str | None = None,
) -> list[int]:
    """Move those of `fact_ids` that are still in status `current` to `to`; returns the ids moved, in order.

    The conditional form of `transition` for decisions two people may take at once (two reviewers
    approving the same facts): one `UPDATE ... WHERE status = current` per chunk, so on every back-end a
    fact is moved by exactly one of several concurrent callers and the others skip it (Postgres
    re-checks the condition after waiting for the other's row lock). The same side effects as
    `transition`; raises IllegalTransition when `current -> to` is not a legal edge. Does not commit.
    """
    if not is_legal(current, to):
        raise IllegalTransition(f"cannot move facts from {current.value} to {to.value} (see docs/ledger.md, 'State machine')")
    _check_arguments(to, error, None, None, None)
    values = _values(current, to, error, None, None, None, None)
    moved: list[int] = []
    for part in chunks(list(dict.fromkeys(fact_ids))):
        result = session.execute(
            update(Fact)
            .where(Fact.id.in_(part), Fact.status == current)
            .values(status=to, status_changed_at=utc_now(), **values)
            .returning(Fact.id),
            execution_options={"synchronize_session": False},
        )
        moved.extend(int(fid) for fid in result.scalars())
    _refresh_loaded(session, moved)
    order = {fid: index for index, fid in enumerate(fact_ids)}
    return sorted(moved, key=order.__getitem__)


def _values(
    origin: FactStatus,
    to: FactStatus,
    error: str | None,
    superseded_by: int | None,
    commit_version: int | None,
    failure_cause: FailureCause | None,
    hold_reason: HoldReason | None,
) -> dict[str, Any]:
    values = _side_effects(origin, to, error, superseded_by, commit_version)
    if "last_error" in values:
        values["failure_cause"] = failure_cause
    if to is S.HELD:
        values["hold_reason"] = hold_reason
    elif origin is S.HELD:
        values["hold_reason"] = None
        if to is S.PENDING:
            values |= {"queued_at": utc_now(), "last_error": None, "failure_cause": None}
    return values


def _check_arguments(
    to: FactStatus, error: str | None, superseded_by: int | None, commit_version: int | None, hold_reason: HoldReason | None
) -> None:
    if to is S.HELD and (hold_reason is None or not error):
        raise LedgerError("moving facts to held needs a hold_reason and an error message saying why")
    if to in (S.REJECTED, S.FAILED) and not error:
        raise LedgerError(f"moving facts to {to.value} needs an error message saying why")
    if to is S.SUPERSEDED and superseded_by is None:
        raise LedgerError("moving facts to superseded needs superseded_by (the id of the newer fact)")


def _lock_statuses(session: Session, ids: list[int]) -> dict[int, FactStatus]:
    current: dict[int, FactStatus] = {}
    for part in chunks(ids):
        rows = session.execute(
            select(Fact.id, Fact.status).where(Fact.id.in_(part)).order_by(Fact.id).with_for_update()
        )
        current.update({fid: status for fid, status in rows})
    missing = [fid for fid in ids if fid not in current]
    if missing:
        raise UnknownFact(f"no fact with id {', '.join(map(str, missing[:10]))} in the ledger")
    return current


def _side_effects(
    origin: FactStatus,
    to: FactStatus,
    error: str | None,
    superseded_by: int | None,
    commit_version: int | None,
) -> dict[str, Any]:
    if to is S.EDITING:
        return {"attempts": Fact.attempts + 1}
    if to is S.PENDING:
        # A requeued fact is no longer applied by any commit; commit_facts keeps the history. A fact the
        # gate sends back for another try keeps the reason (`error`) in last_error.
        return {"commit_version": None} | ({"last_error": error} if error else {})
    if to in (S.REJECTED, S.FAILED, S.HELD):
        return {"last_error": error}
    if to is S.SUPERSEDED:
        return {"superseded_by_id": superseded_by}
    if to is S.COMMITTED and origin is S.SUPERSEDED:
        return {"superseded_by_id": None}
    if to is S.COMMITTED:
        if commit_version is None:
            raise LedgerError("moving facts from editing to committed needs commit_version")
        return {"commit_version": commit_version}
    return {}


def _refresh_loaded(session: Session, ids: list[int]) -> None:
    # The UPDATEs bypass the identity map; expire any Fact already loaded so it re-reads its row.
    wanted = set(ids)
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Fact) and obj.id in wanted:
            session.expire(obj)
