"""Edit examples and their loaders: the real shared files, every accepted form, and clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from editing.data import (
    EditExample,
    examples_hash,
    load_counterfact,
    load_examples,
    load_zsre,
    save_examples,
    zsre_locality_prompt,
)
from editing.errors import DataFormatError


def _write(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


MALMEN_ZSRE = {
    "src": "Which river does the Lech flow into?",
    "ans": "Danube",
    "rephrase": "The Lech is a tributary of which river?",
    "loc": "nq question: who plays the queen in the crown",
    "loc_ans": "Claire Foy",
}

ROME_COUNTERFACT = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": [
        "Shayna does this. Danielle Darrieux spoke",
        "Danielle Darrieux's native tongue is",
    ],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


# --- the shared data files ---------------------------------------------------------------------


def test_zsre_mend_form_from_the_shared_file(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="editing.data"):
        examples = load_zsre(shared_data / "zsre" / "zsre_train.json")
    # two records of the 1,000 have an empty `alt` and are skipped, each with a warning naming it
    assert len(examples) == 998
    assert sum("record 534" in r.getMessage() or "record 723" in r.getMessage() for r in caplog.records) == 2
    first = examples[0]
    assert first == EditExample(
        prompt="What is the product made by UniFirst?",
        target_new="unmanned aircraft",
        target_true="uniform",
        subject="UniFirst",
        rephrase_prompts=("What will be the product of UniFirst?",),
        locality=(("nq question: john goodman's character in the big lebowski?", "Walter Sobchak"),),
    )
    assert all(e.target_new == e.target_new.strip() and e.target_new for e in examples)
    assert all(e.locality[0][0].startswith("nq question: ") and e.locality[0][0].endswith("?") for e in examples)


def test_zsre_old_answer_is_the_gold_answer_not_the_prediction(shared_data: Path) -> None:
    examples = load_zsre(shared_data / "zsre" / "zsre_dev.json", limit=1)
    # record 0 of the dev file: pred "Ramalinales", answers ["Lecanorales"]
    assert examples[0].target_true == "Lecanorales"


def test_counterfact_flat_form_from_the_shared_file(shared_data: Path) -> None:
    examples = load_counterfact(shared_data / "counterfact" / "counterfact_val.json")
    assert len(examples) == 1919
    assert examples[1] == EditExample(
        prompt="The profession of Arun Nehru is",
        target_new="actor",
        target_true="politician",
        subject="Arun Nehru",
        rephrase_prompts=("Arun Nehru is known for",),
        locality=(("George Washington's profession is a", "politician"),),
    )


def test_limit_counts_examples_in_file_order(shared_data: Path) -> None:
    path = shared_data / "counterfact" / "counterfact_train.json"
    assert load_counterfact(path, limit=3) == load_counterfact(path)[:3]
    assert load_counterfact(path, limit=0) == []


def test_load_examples_dispatches_on_the_spec(shared_data: Path) -> None:
    zsre = shared_data / "zsre" / "zsre_dev.json"
    assert load_examples(f"zsre:{zsre}", limit=5) == load_zsre(zsre, limit=5)
    cf = shared_data / "counterfact" / "counterfact_val.json"
    assert load_examples(f"counterfact:{cf}", limit=2) == load_counterfact(cf, limit=2)
    assert len(load_examples("synthetic:7", seed=3)) == 7
    assert len(load_examples("synthetic:7", limit=4)) == 4


# --- the other accepted forms ------------------------------------------------------------------


def test_zsre_malmen_form(tmp_path: Path) -> None:
    (example,) = load_zsre(_write(tmp_path / "z.json", [MALMEN_ZSRE]))
    assert example.prompt == MALMEN_ZSRE["src"]
    assert example.target_new == "Danube"
    assert example.target_true is None
    assert example.subject is None
    assert example.rephrase_prompts == (MALMEN_ZSRE["rephrase"],)
    assert example.locality == (("nq question: who plays the queen in the crown?", "Claire Foy"),)


def test_zsre_locality_question_mark_is_not_doubled() -> None:
    assert zsre_locality_prompt("nq question: who sang it") == "nq question: who sang it?"
    assert zsre_locality_prompt("Who sang it?") == "Who sang it?"


def test_counterfact_rome_form(tmp_path: Path) -> None:
    (example,) = load_counterfact(_write(tmp_path / "cf.json", [ROME_COUNTERFACT]))
    assert example.prompt == "The mother tongue of Danielle Darrieux is"
    assert (example.target_new, example.target_true, example.subject) == (
        "English",
        "French",
        "Danielle Darrieux",
    )
    assert example.rephrase_prompts == tuple(ROME_COUNTERFACT["paraphrase_prompts"])
    assert example.locality == (
        ("The mother tongue of Léon Blum is", "French"),
        ("Michel Rocard is a native speaker of", "French"),
    )


def test_counterfact_flat_form_with_lists(tmp_path: Path) -> None:
    record = {
        "prompt": "Paris is the capital of",
        "target_new": " Italy ",
        "ground_truth": "France",
        "rephrase_prompt": ["The city of Paris is the capital of", "Paris, capital of"],
        "locality_prompt": ["Lyon is in", "Marseille is in"],
        "locality_ground_truth": "France",
    }
    (example,) = load_counterfact(_write(tmp_path / "cf.json", [record]))
    assert example.target_new == "Italy"
    assert example.subject is None
    assert len(example.rephrase_prompts) == 2
    assert example.locality == (("Lyon is in", "France"), ("Marseille is in", "France"))


def test_jsonl_files(tmp_path: Path) -> None:
    path = tmp_path / "z.jsonl"
    path.write_text(json.dumps(MALMEN_ZSRE) + "\n\n" + json.dumps(MALMEN_ZSRE) + "\n", encoding="utf-8")
    assert len(load_zsre(path)) == 2
    path.write_text(json.dumps(MALMEN_ZSRE) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"z\.jsonl: line 2 is not valid JSON"):
        load_zsre(path)


def test_own_form_round_trips(tmp_path: Path) -> None:
    examples = [
        EditExample(
            "The capital of Narnia is",
            "Cair Paravel",
            "Aslan's How",
            "Narnia",
            ("Narnia's capital is",),
            (("The capital of France is", "Paris"),),
        ),
        EditExample("Anna Berg works for", "Nokia"),
    ]
    path = tmp_path / "own.json"
    save_examples(examples, path)
    assert load_examples(f"examples:{path}") == examples


# --- errors name the file, the record and the field --------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"bad\.json is not valid JSON"),
        ('{"src": "x"}', r"bad\.json holds a JSON dict; expected a list"),
        ('[["src"]]', r"bad\.json: record 0 is a list, expected a JSON object"),
        (json.dumps([MALMEN_ZSRE, {"src": "q", "rephrase": "r"}]), r"bad\.json: record 1: not a ZsRE record"),
        (json.dumps([{**MALMEN_ZSRE, "loc": 3}]), r"bad\.json: record 0: field 'loc' must be a string"),
        (
            json.dumps([{k: v for k, v in MALMEN_ZSRE.items() if k != "loc_ans"}]),
            r"record 0: missing field 'loc_ans'",
        ),
        (json.dumps([{**MALMEN_ZSRE, "src": "  "}]), r"record 0: the prompt is empty"),
        (json.dumps([{**MALMEN_ZSRE, "rephrase": ""}]), r"record 0: a rephrase prompt is empty"),
        (json.dumps([{**MALMEN_ZSRE, "loc_ans": " "}]), r"record 0: locality pair 0 has an empty prompt or answer"),
    ],
)
def test_bad_zsre_files_are_reported_precisely(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        load_zsre(path)


def test_bad_counterfact_records(tmp_path: Path) -> None:
    no_slot = json.loads(json.dumps(ROME_COUNTERFACT))
    no_slot["requested_rewrite"]["prompt"] = "The mother tongue is"
    with pytest.raises(DataFormatError, match=r"cf\.json: record 0: requested_rewrite.prompt .* has no '\{\}'"):
        load_counterfact(_write(tmp_path / "cf.json", [no_slot]))
    with pytest.raises(DataFormatError, match=r"record 0: not a CounterFact record"):
        load_counterfact(_write(tmp_path / "cf.json", [MALMEN_ZSRE]))
    mismatched = {
        "prompt": "p",
        "target_new": "a",
        "ground_truth": "b",
        "locality_prompt": ["x", "y", "z"],
        "locality_ground_truth": ["1", "2"],
    }
    with pytest.raises(DataFormatError, match=r"3 locality_prompt entries but 2 locality_ground_truth"):
        load_counterfact(_write(tmp_path / "cf.json", [mismatched]))


def test_own_form_rejects_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"record 0: unknown field\(s\) answer"):
        load_examples(f"examples:{_write(tmp_path / 'e.json', [{'prompt': 'p', 'target_new': 'a', 'answer': 'x'}])}")
    bad_pairs = [{"prompt": "p", "target_new": "a", "locality": [["only one"]]}]
    with pytest.raises(DataFormatError, match=r"'locality' must be a list of \[prompt, answer\]"):
        load_examples(f"examples:{_write(tmp_path / 'e.json', bad_pairs)}")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"nowhere\.json does not exist"):
        load_counterfact(tmp_path / "nowhere.json")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zsre", r"not KIND:ARGUMENT"),
        ("zsre:", r"not KIND:ARGUMENT"),
        ("fever:/x.json", r"unknown kind 'fever'"),
        ("synthetic:many", r"synthetic:N needs a whole number"),
        ("synthetic:0", r"at least 1"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        load_examples(spec)


# --- hashing -----------------------------------------------------------------------------------


def test_examples_hash_is_the_sha256_of_the_canonical_json() -> None:
    examples = [EditExample("p", "a", locality=(("q", "b"),))]
    canonical = (
        '[{"locality":[["q","b"]],"prompt":"p","rephrase_prompts":[],"subject":null,'
        '"target_new":"a","target_true":null}]'
    )
    assert examples_hash(examples) == hashlib.sha256(canonical.encode()).hexdigest()


def test_examples_hash_sees_every_field_and_the_order() -> None:
    a = EditExample("p", "a", "t", "s", ("r",), (("q", "b"),))
    b = EditExample("p2", "a2")
    base = examples_hash([a, b])
    assert examples_hash([a, b]) == base
    assert examples_hash([b, a]) != base
    variants = [
        EditExample("p", "a", "t", "s", ("r",), (("q", "c"),)),
        EditExample("p", "a", "t", "s", ("r", "r2"), (("q", "b"),)),
        EditExample("p", "a", "t", None, ("r",), (("q", "b"),)),
        EditExample("p", "a", "u", "s", ("r",), (("q", "b"),)),
    ]
    assert len({examples_hash([v, b]) for v in variants} | {base}) == len(variants) + 1
