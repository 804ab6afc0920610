"""A built-in generator of counterfactual facts, so that an editor can be trained without any data set.

Each fact puts a made-up subject (a person "Greta Lindqvist", a country "Velmoria", a city "Torhaven",
a company "Kelvion Labs") into one of 16 relations (mother tongue, plays the sport of, is employed by,
was born in, the capital of, the official language of, is headquartered in, ...) with a real-world object.
`target_true` and `target_new` are two different objects of the relation; the prompt and two paraphrases
are three different templates of the relation; the unrelated prompts are real-world facts (capitals,
languages, landmarks) that do not mention any edited subject, so their answers are known and the
unedited model tends to get them right.

The entity lists and templates are data, in `synthetic_entities.json` beside this file, read when the
generator is called.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editing.data import EditExample

ENTITIES_FILE = Path(__file__).with_name("synthetic_entities.json")
N_PARAPHRASES = 2
N_LOCALITY = 2


@dataclass(frozen=True)
class Relation:
    """A relation from a kind of subject to a kind of object, with its prompt templates ("{}" = subject)."""

    name: str
    subject_kind: str
    object_kind: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    """Everything the generator draws from: made-up subjects per kind, objects per kind, relations, facts."""

    subjects: dict[str, tuple[str, ...]]
    objects: dict[str, tuple[str, ...]]
    relations: tuple[Relation, ...]
    locality_facts: tuple[tuple[str, str], ...]


def _subject_names(data: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    stems = data["place_stems"]
    products = itertools.product
    # the suffix lists are disjoint, so a country, a city and a company never share a name
    return {
        "person": tuple(
            f"{first} {last}" for first, last in products(data["first_names"], data["last_names"])
        ),
        "country": tuple(stem + end for stem, end in products(stems, data["country_suffixes"])),
        "city": tuple(stem + end for stem, end in products(stems, data["city_suffixes"])),
        "company": tuple(
            f"{stem}{core} {kind}"
            for stem, core, kind in products(stems, data["company_cores"], data["company_kinds"])
        ),
    }


def load_vocabulary(path: Path = ENTITIES_FILE) -> Vocabulary:
    """Read the entity lists and templates (the default file ships with the package)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    relations = tuple(
        Relation(r["name"], r["subject"], r["object"], tuple(r["templates"])) for r in data["relations"]
    )
    for relation in relations:
        if len(relation.templates) <= N_PARAPHRASES:
            raise ValueError(f"{path}: relation {relation.name!r} needs more than {N_PARAPHRASES} templates")
    return Vocabulary(
        subjects=_subject_names(data),
        objects={kind: tuple(names) for kind, names in data["objects"].items()},
        relations=relations,
        locality_facts=tuple((prompt, answer) for prompt, answer in data["locality_facts"]),
    )


def _subject_pools(vocabulary: Vocabulary) -> dict[str, list[str]]:
    """Distinct subjects per kind, leaving out any that a locality prompt mentions."""
    mentioned = " ".join(prompt for prompt, _ in vocabulary.locality_facts)
    kinds = {relation.subject_kind for relation in vocabulary.relations}
    return {
        kind: [s for s in dict.fromkeys(vocabulary.subjects[kind]) if s not in mentioned] for kind in kinds
    }


def capacity(vocabulary: Vocabulary) -> int:
    """How many distinct facts the vocabulary can give (one per usable subject)."""
    return sum(len(pool) for pool in _subject_pools(vocabulary).values())


def _fact(rng: random.Random, vocabulary: Vocabulary, relation: Relation, subject: str) -> EditExample:
    target_true, target_new = rng.sample(vocabulary.objects[relation.object_kind], 2)
    prompt, *paraphrases = rng.sample(relation.templates, 1 + N_PARAPHRASES)
    return EditExample(
        prompt=prompt.format(subject),
        target_new=target_new,
        target_true=target_true,
        subject=subject,
        rephrase_prompts=tuple(p.format(subject) for p in paraphrases),
        locality=tuple(rng.sample(vocabulary.locality_facts, N_LOCALITY)),
    )


def synthetic_examples(n: int, seed: int, vocabulary: Vocabulary | None = None) -> list[EditExample]:
    """`n` counterfactual facts with distinct subjects, the same for the same (n, seed).

    A prefix of a longer list is not the shorter list: change `n` and the facts change. Raises
    ValueError if `n` is not positive or exceeds the vocabulary's capacity (about 5,000).
    """
    vocabulary = vocabulary or load_vocabulary()
    pools = _subject_pools(vocabulary)
    available = sum(len(pool) for pool in pools.values())
    if not 1 <= n <= available:
        raise ValueError(f"synthetic_examples: n must be between 1 and {available}, got {n}")
    rng = random.Random(seed)
    for kind in sorted(pools):
        rng.shuffle(pools[kind])
    examples: list[EditExample] = []
    while len(examples) < n:
        # relations whose subject kind ran out drop out, so every fact gets a fresh subject
        relation = rng.choice([r for r in vocabulary.relations if pools[r.subject_kind]])
        examples.append(_fact(rng, vocabulary, relation, pools[relation.subject_kind].pop()))
    return examples
