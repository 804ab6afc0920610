"""add_facts (dedup, provenance, supersession), add_rejections and the source functions."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from store import intake, states
from store.errors import InvalidFact, LedgerError, UnknownSource
from store.models import Fact, FactOrigin, FactStatus, Rejection, Source
from store.records import FactIn, Locality, RejectionIn
from tests.store.factories import add, commit, fact, origin, status_of


def test_add_facts_stores_normalised_fields_and_provenance(session: Session) -> None:
    observed = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    item = FactIn(
        prompt="  The capital of\tFrance is ",
        target_new="Lyon ",
        subject="France",
        ground_truth="Paris",
        rephrase_prompts=("France's  capital is", "   "),
        locality=(Locality(prompt="2 + 2 =", answer=" 4"),),
        external_id="r1",
        observed_at=observed,
    )
    result = intake.add_facts(session=session, items=[(item, origin("feed:x", "https://x/feed", "guid-1"))])
    assert (result.accepted, result.duplicates, result.superseded) == (1, 0, 0)
    stored = session.get(Fact, result.fact_ids[0])
    assert stored is not None
    assert (stored.prompt, stored.target_new, stored.status) == (
        "The capital of France is",
        "Lyon",
        FactStatus.PENDING,
    )
    assert stored.rephrase_prompts == ["France's capital is"]
    assert stored.locality == [{"prompt": "2 + 2 =", "answer": "4"}]
    assert stored.observed_at == observed and stored.received_at.tzinfo is not None
    assert (stored.origin_location, stored.origin_position, stored.external_id) == (
        "https://x/feed",
        "guid-1",
        "r1",
    )
    source = intake.get_source(session=session, name="feed:x")
    assert source is not None and source.kind == intake.ADHOC_SOURCE_KIND and source.id == stored.source_id


def test_duplicate_from_two_sources_is_stored_once_with_both_origins(session: Session) -> None:
    first = intake.add_facts(session=session, items=[(fact(), origin("inbox", "a.jsonl", "line 3"))])
    again = intake.add_facts(
        session=session,
        items=[
            (fact("The capital of  France is", "Lyon"), origin("feed:y", "https://y", "e7")),
            (fact(), origin("inbox", "b.jsonl", "line 1")),
        ],
    )
    assert (again.accepted, again.duplicates) == (0, 2)
    assert again.fact_ids == first.fact_ids * 2
    assert session.scalar(select(func.count()).select_from(Fact)) == 1
    origins = session.execute(
        select(Source.name, FactOrigin.location, FactOrigin.position).join(Source).order_by(FactOrigin.id)
    ).all()
    assert [tuple(o) for o in origins] == [
        ("inbox", "a.jsonl", "line 3"),
        ("feed:y", "https://y", "e7"),
        ("inbox", "b.jsonl", "line 1"),
    ]


def test_duplicates_inside_one_batch_map_to_one_fact(session: Session) -> None:
    result = intake.add_facts(session=session, items=[(fact(), origin()), (fact(), origin(position="line 2"))])
    assert (result.accepted, result.duplicates) == (1, 1)
    assert result.fact_ids[0] == result.fact_ids[1]


def test_newer_target_supersedes_pending_fact(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    result = intake.add_facts(session=session, items=[(fact(target="Marseille"), origin())])
    (new,) = result.fact_ids
    assert result.superseded == 1
    assert status_of(session, old) is FactStatus.SUPERSEDED
    old_row, new_row = session.get(Fact, old), session.get(Fact, new)
    assert old_row is not None and new_row is not None
    assert old_row.superseded_by_id == new and new_row.supersedes_id == old


def test_supersession_within_one_batch_keeps_the_last(session: Session) -> None:
    result = intake.add_facts(
        session=session,
        items=[(fact(target="A"), origin()), (fact(target="B"), origin()), (fact(target="C"), origin())],
    )
    a, b, c = result.fact_ids
    assert (result.accepted, result.superseded) == (3, 2)
    assert [status_of(session, i) for i in (a, b, c)] == [FactStatus.SUPERSEDED] * 2 + [FactStatus.PENDING]
    rows = {f.id: f for f in session.scalars(select(Fact))}
    assert (rows[b].supersedes_id, rows[c].supersedes_id) == (a, b)
    assert (rows[a].superseded_by_id, rows[b].superseded_by_id) == (b, c)


def test_flip_flop_back_to_superseded_target_makes_a_new_fact(session: Session) -> None:
    result = intake.add_facts(
        session=session,
        items=[(fact(target="A"), origin()), (fact(target="B"), origin()), (fact(target="A"), origin())],
    )
    a, b, a2 = result.fact_ids
    assert a2 not in (a, b)
    assert [status_of(session, i) for i in (a, b, a2)] == [
        FactStatus.SUPERSEDED,
        FactStatus.SUPERSEDED,
        FactStatus.PENDING,
    ]


def test_newer_target_for_committed_fact_is_new_edit_and_supersedes_on_commit(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    commit(session, old)
    (new,) = add(session, fact(target="Marseille"))
    assert status_of(session, old) is FactStatus.COMMITTED
    assert status_of(session, new) is FactStatus.PENDING
    row = session.get(Fact, new)
    assert row is not None and row.supersedes_id == old
    commit(session, new)
    assert status_of(session, old) is FactStatus.SUPERSEDED
    old_row = session.get(Fact, old)
    assert old_row is not None and old_row.superseded_by_id == new


def test_repeat_of_committed_fact_supersedes_newer_pending_one(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    commit(session, old)
    (new,) = add(session, fact(target="Marseille"))
    result = intake.add_facts(session=session, items=[(fact(target="Lyon"), origin())])
    assert result.fact_ids == (old,) and result.duplicates == 1 and result.superseded == 1
    assert status_of(session, new) is FactStatus.SUPERSEDED


def test_repeat_of_rejected_fact_changes_nothing_else(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    states.transition(session=session, fact_ids=[old], to=FactStatus.EDITING)
    states.transition(session=session, fact_ids=[old], to=FactStatus.REJECTED, error="gate: efficacy 0.1")
    (new,) = add(session, fact(target="Marseille"))
    result = intake.add_facts(session=session, items=[(fact(target="Lyon"), origin())])
    assert result.fact_ids == (old,) and result.superseded == 0
    assert status_of(session, old) is FactStatus.REJECTED and status_of(session, new) is FactStatus.PENDING


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (FactIn(prompt="  ", target_new="x"), "prompt is empty"),
        (FactIn(prompt="p", target_new="\u2003"), "target_new is empty"),
        (FactIn(prompt="p", target_new="x", observed_at=datetime(2026, 1, 1)), "has no time zone"),
    ],
)
def test_invalid_fact_names_origin_and_writes_nothing(session: Session, item: FactIn, message: str) -> None:
    with pytest.raises(InvalidFact, match=rf"inbox: facts.jsonl line 1: .*{message}"):
        intake.add_facts(session=session, items=[(fact(), origin()), (item, origin())])
    assert session.scalar(select(func.count()).select_from(Fact)) == 0


def test_add_facts_empty_batch(session: Session) -> None:
    assert intake.add_facts(session=session, items=[]).fact_ids == ()


def test_add_rejections_records_origin_excerpt_and_reason(session: Session) -> None:
    items = [
        RejectionIn(origin=origin("inbox", "bad.jsonl", "line 4"), excerpt='{"prompt": ""}', reason="prompt: empty"),
        RejectionIn(origin=origin("feed:z", "https://z", "e1"), excerpt="x" * 5000, reason="not JSON"),
    ]
    assert intake.add_rejections(session=session, items=items) == 2
    rows = session.execute(select(Source.name, Rejection).join(Source).order_by(Rejection.id)).all()
    assert [(name, r.location, r.position, r.reason) for name, r in rows] == [
        ("inbox", "bad.jsonl", "line 4", "prompt: empty"),
        ("feed:z", "https://z", "e1", "not JSON"),
    ]
    assert len(rows[1][1].excerpt) == intake.MAX_EXCERPT_CHARS
    assert intake.add_rejections(session=session, items=[]) == 0


def test_ensure_source_upserts_and_resets_poll_state_when_location_changes(session: Session) -> None:
    created = intake.ensure_source(session=session, name="feed:r", kind="rss", location="https://r/1")
    intake.update_source_poll_state(session=session, name="feed:r", etag='"e1"', cursor="12", ok=True)
    same = intake.ensure_source(session=session, name="feed:r", kind="rss", location="https://r/1")
    assert same.id == created.id and same.etag == '"e1"' and same.cursor == "12"
    moved = intake.ensure_source(session=session, name="feed:r", kind="atom", location="https://r/2")
    assert (moved.kind, moved.location, moved.etag, moved.cursor) == ("atom", "https://r/2", None, None)


def test_poll_state_tracks_health_and_keeps_unspecified_fields(session: Session) -> None:
    intake.ensure_source(session=session, name="s", kind="jsonl", location="/x")
    intake.update_source_poll_state(session=session, name="s", etag="E", last_modified="LM", cursor="10", ok=True)
    intake.update_source_poll_state(session=session, name="s", ok=False, error="HTTP 503 from https://x")
    intake.update_source_poll_state(session=session, name="s", ok=False, error=None)
    source = intake.get_source(session=session, name="s")
    assert source is not None
    assert (source.etag, source.last_modified, source.cursor) == ("E", "LM", "10")
    assert (source.consecutive_failures, source.healthy) == (2, False)
    assert source.last_error == "poll failed (no error message given)"
    first_success = source.last_success_at
    intake.update_source_poll_state(session=session, name="s", cursor=None, ok=True)
    assert (source.consecutive_failures, source.healthy, source.cursor) == (0, True, None)
    assert source.last_success_at is not None and first_success is not None
    assert source.last_success_at >= first_success


def test_poll_state_of_unknown_source_is_an_error(session: Session) -> None:
    with pytest.raises(UnknownSource, match="'nope'"):
        intake.update_source_poll_state(session=session, name="nope", ok=True)
    assert intake.get_source(session=session, name="nope") is None


def test_facts_are_durable_after_commit(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session, session.begin():
        ids = add(session, fact(), fact("q", "r"))
    with session_factory() as session:
        assert [f.id for f in session.scalars(select(Fact).order_by(Fact.id))] == ids


def test_bulk_inserted_values_are_stored_as_the_orm_stores_them(session: Session) -> None:
    when = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)  # microsecond 0: sqlite3 would drop ".000000"
    add(session, fact(observed_at=when, locality=(Locality("a", "b"),)))
    session.flush()
    raw = session.execute(
        text(
            "SELECT f.observed_at, f.received_at, s.created_at, f.locality, f.status FROM facts f JOIN sources s ON s.id = f.source_id"
        )
    ).one()
    observed, received, created, locality, status = raw
    if session.get_bind().dialect.name == "sqlite":
        pattern = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$"  # SQLAlchemy's SQLite DATETIME format
        assert observed == "2026-11-21 10:00:00.000000"
        assert re.match(pattern, received) and re.match(pattern, created)
        assert json.loads(locality) == [{"prompt": "a", "answer": "b"}]
    else:
        assert observed == when and received.tzinfo is not None and created.tzinfo is not None
        assert locality == [{"prompt": "a", "answer": "b"}]
    assert status == "pending"


@pytest.mark.parametrize(("name", "kind"), [("", "rss"), ("x" * 201, "rss"), ("feed", " "), ("feed", "k" * 41)])
def test_source_names_and_kinds_are_checked(session: Session, name: str, kind: str) -> None:
    with pytest.raises(LedgerError, match="must be 1 to"):
        intake.ensure_source(session=session, name=name, kind=kind, location="/x")


def test_fact_from_an_unnamed_source_is_refused(session: Session) -> None:
    with pytest.raises(LedgerError, match="source name '' must be 1 to 200 characters"):
        intake.add_facts(session=session, items=[(fact(), origin(source=""))])


def test_json_columns_hold_the_text_json_dumps_writes(session: Session) -> None:
    rephrases = ('Say "hi" \\ there', "Café  crème", "emoji \U0001f600 and \u2028 separator", "  ")
    locality = (Locality('q "x"', "é"), Locality("a\tb", "c"))
    add(session, fact(rephrase_prompts=rephrases, locality=locality), fact("p2", "t2"))
    session.flush()
    rows = session.execute(text("SELECT rephrase_prompts, locality FROM facts ORDER BY id")).all()
    expected_rephrases = ['Say "hi" \\ there', "Café crème", "emoji \U0001f600 and separator"]
    expected_locality = [{"prompt": 'q "x"', "answer": "é"}, {"prompt": "a b", "answer": "c"}]
    if session.get_bind().dialect.name == "sqlite":  # the raw text, exactly as json.dumps writes it
        assert rows[0] == (json.dumps(expected_rephrases), json.dumps(expected_locality))
        assert rows[1] == ("[]", "[]")
    else:
        assert rows[0] == (expected_rephrases, expected_locality)
        assert rows[1] == ([], [])


def test_stored_facts_superseded_by_different_newer_facts_in_one_batch(session: Session) -> None:
    old_p, old_q, old_r = add(session, fact("p", "A"), fact("q", "A"), fact("r", "A"))
    result = intake.add_facts(
        session=session,
        items=[(fact("p", "B"), origin()), (fact("q", "B"), origin()), (fact("q", "C"), origin())],
    )
    new_p, new_qb, new_qc = result.fact_ids
    assert (result.accepted, result.superseded) == (3, 3)
    session.expire_all()
    rows = {f.id: f for f in session.scalars(select(Fact))}
    assert [rows[i].status for i in (old_p, old_q, old_r, new_p, new_qb, new_qc)] == [
        FactStatus.SUPERSEDED,
        FactStatus.SUPERSEDED,
        FactStatus.PENDING,
        FactStatus.PENDING,
        FactStatus.SUPERSEDED,
        FactStatus.PENDING,
    ]
    assert (rows[old_p].superseded_by_id, rows[old_q].superseded_by_id) == (new_p, new_qb)
    assert rows[new_qb].superseded_by_id == new_qc and rows[old_r].superseded_by_id is None
    assert (rows[new_p].supersedes_id, rows[new_qb].supersedes_id, rows[new_qc].supersedes_id) == (
        old_p,
        old_q,
        new_qb,
    )


def test_supersession_of_a_fact_claimed_meanwhile_is_refused(session: Session) -> None:
    (old,) = add(session, fact(target="A"))
    states.transition(session=session, fact_ids=[old], to=FactStatus.EDITING)
    # An editing fact is live: the newer target is a new fact, and the editing one is left alone.
    result = intake.add_facts(session=session, items=[(fact(target="B"), origin())])
    assert result.superseded == 0 and status_of(session, old) is FactStatus.EDITING


def test_observed_at_is_stored_in_utc_on_the_fact_and_every_origin(session: Session) -> None:
    paris = timezone(timedelta(hours=1))
    same_instant = [datetime(2026, 11, 21, 11, 0, tzinfo=paris), datetime(2026, 11, 21, 10, 0, tzinfo=UTC)]
    later = datetime(2026, 11, 21, 10, 0, 1, 5, tzinfo=UTC)
    ids = add(
        session,
        fact("p1", observed_at=same_instant[0]),
        fact("p2", observed_at=same_instant[1]),
        fact("p1", observed_at=later),  # a duplicate: only its origin row keeps this time
        fact("p3"),
    )
    session.expire_all()
    facts = {f.id: f.observed_at for f in session.scalars(select(Fact))}
    assert [facts[i] for i in ids] == [same_instant[1], same_instant[1], same_instant[1], None]
    origins = session.scalars(select(FactOrigin.observed_at).order_by(FactOrigin.id)).all()
    assert origins == [same_instant[1], same_instant[1], later, None]
    assert all(moment is None or moment.tzinfo is not None for moment in origins)


def test_sources_first_seen_in_a_batch_are_created_in_order_with_their_first_location(session: Session) -> None:
    intake.ensure_source(session=session, name="known", kind="jsonl", location="/known")
    items = [
        (fact("p1"), origin("feed:b", "https://b/1")),
        (fact("p2"), origin("known", "/elsewhere")),
        (fact("p3"), origin("feed:a", "https://a/1")),
        (fact("p4"), origin("feed:b", "https://b/2")),
    ]
    ids = intake.add_facts(session=session, items=items).fact_ids
    sources = session.execute(select(Source.name, Source.kind, Source.location).order_by(Source.id)).all()
    assert [tuple(s) for s in sources] == [
        ("known", "jsonl", "/known"),
        ("feed:b", intake.ADHOC_SOURCE_KIND, "https://b/1"),
        ("feed:a", intake.ADHOC_SOURCE_KIND, "https://a/1"),
    ]
    by_name = {name: sid for sid, name in session.execute(select(Source.id, Source.name))}
    session.expire_all()
    assert [session.get(Fact, i).source_id for i in ids] == [  # type: ignore[union-attr]
        by_name["feed:b"],
        by_name["known"],
        by_name["feed:a"],
        by_name["feed:b"],
    ]
