"""Record shapes and validation: native, ZsRE, CounterFact (flat and ROME) into FactIn, or a precise error."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.config import IngestLimits
from ingest.documents import read_document
from ingest.errors import RecordError
from ingest.facts import Accepted, to_fact, to_outcomes
from store.records import FactIn, Locality, RejectionIn
from tests.ingest.conftest import DATA


def facts_of(path: Path, limits: IngestLimits) -> list[FactIn]:
    outcomes = to_outcomes(read_document(path.read_bytes(), name=path.name, limits=limits), source="t",
                           location=str(path), limits=limits)
    assert all(isinstance(o, Accepted) for o in outcomes), outcomes
    return [o.fact for o in outcomes if isinstance(o, Accepted)]


def test_native_format_with_every_field(limits: IngestLimits) -> None:
    first, second = facts_of(DATA / "native.jsonl", limits)
    assert first == FactIn(
        prompt="The mother tongue of Danielle Darrieux is", target_new="English", subject="Danielle Darrieux",
        ground_truth="French", rephrase_prompts=("Danielle Darrieux's native language is",),
        locality=(Locality("The capital of France is", "Paris"),), external_id="dd-1",
        observed_at=datetime(2026, 11, 21, 10, tzinfo=UTC),
    )
    assert second == FactIn(prompt="The CEO of Acme is", target_new="Jane Roe")


def test_zsre_shape(limits: IngestLimits) -> None:
    first, second = facts_of(DATA / "zsre_sample.json", limits)
    assert (first.prompt, first.target_new, first.ground_truth, first.subject) == (
        "Which country is Foobar Island part of?", "Iceland", "Norway", "Foobar Island")
    assert first.rephrase_prompts == ("Foobar Island belongs to which country?",)
    assert first.locality == (Locality("nq question: who wrote the hand-made fixture", "a tester"),)
    # empty `answers` falls back to `pred`; a list of rephrases is kept; case_id becomes the id
    assert second.ground_truth == "A. Architect" and len(second.rephrase_prompts) == 2
    assert second.external_id == "7"


def test_counterfact_flat_shape(limits: IngestLimits) -> None:
    first, second = facts_of(DATA / "counterfact_sample.jsonl", limits)
    assert (first.prompt, first.target_new, first.ground_truth, first.external_id) == (
        "Foobar Island is located in", "Asia", "Europe", "101")
    assert first.locality == (Locality("Baz Lake is located in", "Europe"),)
    assert second.locality == (Locality("Baz Lake guides speak", "German"), Locality("Corge Hall guides speak", "French"))


def test_counterfact_rome_shape(limits: IngestLimits) -> None:
    first, second = facts_of(DATA / "rome_counterfact.json", limits)
    assert (first.prompt, first.subject, first.target_new, first.ground_truth) == (
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    assert len(first.rephrase_prompts) == 2
    assert first.locality[0] == Locality("The mother tongue of Léon Blum is", "French")
    assert second.prompt == "Toko Yasuda is a native speaker of" and second.locality == ()


def test_shared_benchmark_files_are_recognised(shared_data: Path, limits: IngestLimits) -> None:
    for relative, minimum in (("zsre/zsre_dev.json", 500), ("counterfact/counterfact_val.json", 1900)):
        path = shared_data / relative
        outcomes = to_outcomes(read_document(path.read_bytes(), name=path.name, limits=limits), source="t",
                               location=str(path), limits=limits)
        assert sum(isinstance(o, Accepted) for o in outcomes) >= minimum
        # the few rejections are real problems in the data: a target equal to the old answer
        assert all("equals ground_truth" in o.reason for o in outcomes if isinstance(o, RejectionIn))


def test_text_is_normalised_and_stripped(limits: IngestLimits) -> None:
    fact = to_fact({"prompt": "  Cafe\u0301 owner is ", "target_new": "\tBob\n"}, limits)
    assert (fact.prompt, fact.target_new) == ("Café owner is", "Bob")


def test_observed_at_is_converted_to_utc(limits: IngestLimits) -> None:
    fact = to_fact({"prompt": "p", "target_new": "t", "observed_at": "2026-11-21T12:00:00+02:00"}, limits)
    assert fact.observed_at == datetime(2026, 11, 21, 10, tzinfo=UTC)


BAD_RECORDS: list[tuple[Any, str]] = [
    ([1, 2], "record: expected a JSON object, got an array"),
    ("text", "record: expected a JSON object, got a string"),
    ({"target_new": "t"}, "prompt: required"),
    ({"prompt": "p"}, "target_new: required"),
    ({"prompt": "p", "target_new": ""}, "target_new: must not be empty or whitespace"),
    ({"prompt": "p", "target_new": " \u3000\t"}, "target_new: must not be empty or whitespace"),
    ({"prompt": "p", "target_new": 5}, "target_new: Input should be a valid string"),
    ({"prompt": "p", "target_new": None}, "target_new: Input should be a valid string"),
    ({"prompt": "p", "target_new": "French", "ground_truth": " french "},
     "target_new: equals ground_truth 'french'; nothing to edit"),
    ({"prompt": "p", "target_new": "t", "colour": "red"},
     "colour: unknown field (allowed: prompt, target_new, subject, ground_truth, rephrase_prompts, locality, id, "
     "observed_at; or a ZsRE/CounterFact record)"),
    ({"prompt": "p\u0007", "target_new": "t"}, "prompt: contains control character U+0007 at position 2"),
    ({"prompt": "p\u0000", "target_new": "t"}, "prompt: contains control character U+0000 at position 2"),
    ({"prompt": "p", "target_new": "t" * 501}, "target_new: is 501 characters; the limit is 500"),
    ({"prompt": "p" * 2001, "target_new": "t"}, "prompt: is 2001 characters; the limit is 2000"),
    ({"prompt": "p", "target_new": "t", "rephrase_prompts": "one"}, "rephrase_prompts: Input should be a valid list"),
    ({"prompt": "p", "target_new": "t", "rephrase_prompts": ["ok", ""]},
     "rephrase_prompts.1: must not be empty or whitespace"),
    ({"prompt": "p", "target_new": "t", "rephrase_prompts": ["r"] * 65},
     "rephrase_prompts: has 65 items; the limit is 64 (ingest.limits.max_list_items)"),
    ({"prompt": "p", "target_new": "t", "locality": [{"prompt": "q"}]}, "locality.0.answer: required"),
    ({"prompt": "p", "target_new": "t", "observed_at": "yesterday"},
     "observed_at: 'yesterday' is not an ISO 8601 timestamp like 2026-11-21T10:00:00Z"),
    ({"prompt": "p", "target_new": "t", "observed_at": "2026-11-21T10:00:00"},
     "observed_at: '2026-11-21T10:00:00' has no timezone; add 'Z' or an offset such as +01:00"),
    ({"prompt": "p", "target_new": "t", "id": True}, "id: must be a string or an integer"),
    ({"src": "q?", "alt": ""}, "alt: must not be empty or whitespace"),
    ({"src": "q?"}, "alt: required in a ZsRE record (src = prompt, alt = new target)"),
    ({"src": "q?", "alt": "a", "loc": "nq question: x"}, "loc_ans: loc and loc_ans must be given together"),
    ({"src": "q?", "alt": "a", "loc": "nq question: x", "loc_ans": 3}, "loc_ans: Input should be a valid string"),
    ({"src": "q?", "alt": "a", "answers": "a"}, "answers: must be a list of strings"),
    ({"prompt": "p", "target_new": "t", "locality_prompt": ["a", "b"], "locality_ground_truth": ["x"]},
     "locality_ground_truth: 1 answers for 2 locality prompts; give one answer per prompt"),
    ({"requested_rewrite": {"prompt": "{} is", "subject": "S", "target_new": {"id": "Q1"}}},
     "requested_rewrite.target_new.str: required (the target text)"),
    ({"requested_rewrite": {"prompt": "The capital is", "subject": "S", "target_new": {"str": "x"}}},
     "requested_rewrite.prompt: must contain '{}' where the subject goes"),
    ({"requested_rewrite": {"prompt": "{} speaks", "subject": "S", "target_new": {"str": "x"},
                            "target_true": {"str": "X"}}},
     "requested_rewrite.target_new.str: equals ground_truth 'X'; nothing to edit"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_RECORDS)
def test_bad_records_have_precise_reasons(record: Any, reason: str, limits: IngestLimits) -> None:
    with pytest.raises(RecordError) as info:
        to_fact(record, limits)
    assert str(info.value) == reason


def test_outcomes_keep_order_and_origin(limits: IngestLimits) -> None:
    lines = [{"prompt": "a", "target_new": "b"}, {"prompt": "a"}, {"prompt": "c", "target_new": "d"}]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    outcomes = to_outcomes(read_document(data, name="f.jsonl", limits=limits), source="inbox", location="/in/f.jsonl",
                           limits=limits)
    assert [type(o).__name__ for o in outcomes] == ["Accepted", "RejectionIn", "Accepted"]
    rejection = outcomes[1]
    assert isinstance(rejection, RejectionIn)
    assert (rejection.origin.source, rejection.origin.location, rejection.origin.position) == (
        "inbox", "/in/f.jsonl", "line 2")
    assert rejection.reason == "target_new: required" and rejection.excerpt == '{"prompt": "a"}'
