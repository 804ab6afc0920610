"""The built-in counterfactual fact generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editing.data import examples_hash
from editing.engine.synthetic import ENTITIES_FILE, capacity, load_vocabulary, synthetic_examples


def test_same_seed_same_facts_other_seed_other_facts() -> None:
    assert examples_hash(synthetic_examples(50, 7)) == examples_hash(synthetic_examples(50, 7))
    assert examples_hash(synthetic_examples(50, 7)) != examples_hash(synthetic_examples(50, 8))


def test_facts_are_well_formed_counterfactuals() -> None:
    examples = synthetic_examples(400, 0)
    subjects = [e.subject for e in examples]
    assert len(set(subjects)) == len(examples)
    assert len({e.prompt for e in examples}) == len(examples)
    for e in examples:
        assert e.subject is not None and e.subject in e.prompt
        assert e.target_new and e.target_true and e.target_new != e.target_true
        assert len(e.rephrase_prompts) >= 2
        assert len({e.prompt, *e.rephrase_prompts}) == 1 + len(e.rephrase_prompts)
        assert all(e.subject in p for p in e.rephrase_prompts)
        assert len(e.locality) >= 2


def test_unrelated_prompts_mention_no_edited_subject() -> None:
    examples = synthetic_examples(capacity(load_vocabulary()), 3)
    locality_text = " ".join(p for e in examples for p, _ in e.locality)
    assert not [e.subject for e in examples if e.subject and e.subject in locality_text]


def test_many_relations_and_entities_are_used() -> None:
    vocabulary = load_vocabulary()
    assert len(vocabulary.relations) >= 12
    assert all(len(names) >= 300 for names in vocabulary.subjects.values())
    assert sum(len(names) for names in vocabulary.objects.values()) >= 200
    examples = synthetic_examples(300, 1)
    objects = {e.target_new for e in examples} | {e.target_true for e in examples}
    assert len(objects) >= 100
    # which relation a fact uses shows in its prompt's template; count the distinct templates seen
    templates = {e.prompt.replace(e.subject or "", "{}") for e in examples}
    assert len(templates) >= 30


def test_objects_fit_the_relation() -> None:
    vocabulary = load_vocabulary()
    by_template = {t: r for r in vocabulary.relations for t in r.templates}
    for e in synthetic_examples(200, 2):
        relation = by_template[e.prompt.replace(e.subject or "", "{}")]
        assert {e.target_new, e.target_true} <= set(vocabulary.objects[relation.object_kind])


def test_bounds_are_enforced() -> None:
    limit = capacity(load_vocabulary())
    assert limit > 4000
    with pytest.raises(ValueError, match=f"between 1 and {limit}"):
        synthetic_examples(limit + 1, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        synthetic_examples(0, 0)


def test_a_vocabulary_with_too_few_templates_is_rejected(tmp_path: Path) -> None:
    data = json.loads(ENTITIES_FILE.read_text(encoding="utf-8"))
    data["relations"][0]["templates"] = data["relations"][0]["templates"][:2]
    path = tmp_path / "entities.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="needs more than 2 templates"):
        load_vocabulary(path)
