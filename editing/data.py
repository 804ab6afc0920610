"""Edit examples and the loaders that turn data-set files into them.

An `EditExample` is one fact to write into the model, together with the prompts that measure the edit:
paraphrases of the prompt (generalisation) and unrelated (prompt, answer) pairs (specificity). Every
loader returns plain `EditExample`s, so the editor, the trainer and the metrics never see a file format.

Accepted inputs (docs/data.md has the details and the choices made):

- ZsRE, MEND/EasyEdit form (`src, alt, answers, pred, rephrase, loc, loc_ans, subject`) and MALMEN form
  (`src, ans, rephrase, loc, loc_ans`). The locality prompt is `loc` with "?" appended, as the
  reference loaders do (the MEND-derived `loc` strings are "nq question: ..." without a question mark).
- CounterFact, EasyEdit flat form (`prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth`) and ROME form (`requested_rewrite`, `paraphrase_prompts`,
  `neighborhood_prompts`).
- This project's own form: objects with the fields of `EditExample` (`examples:PATH`).

Files are JSON lists, or JSON Lines when the name ends in `.jsonl`. Answers have surrounding whitespace
removed (a few ZsRE `alt` strings start with a space, which would otherwise tokenise as an extra token).
Records whose new target is empty are skipped with a warning naming the file and record; any other
malformed record raises `DataFormatError` naming the file, the record and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from editing.errors import DataFormatError

logger = logging.getLogger(__name__)

Record = dict[str, Any]


@dataclass(frozen=True)
class EditExample:
    """One fact to edit in: `prompt` should be completed by `target_new` (instead of `target_true`)."""

    prompt: str
    target_new: str
    target_true: str | None = None  # the old answer (ground truth), when known
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()  # paraphrases of the prompt (generalisation)
    locality: tuple[tuple[str, str], ...] = ()  # unrelated (prompt, answer) pairs (specificity)

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON form (lists for the tuples); `examples:PATH` files hold a list of these."""
        as_dict = asdict(self)
        as_dict["rephrase_prompts"] = list(self.rephrase_prompts)
        as_dict["locality"] = [list(pair) for pair in self.locality]
        return as_dict


class _Where:
    """The place of one record in one file, for error messages."""

    def __init__(self, path: Path, index: int) -> None:
        self.path = path
        self.index = index

    def __str__(self) -> str:
        return f"{self.path}: record {self.index}"


def read_records(path: Path) -> list[Record]:
    """The JSON objects in `path`: a JSON list, or one object per line when the name ends in `.jsonl`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"data file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"cannot read data file {path}: {exc}") from exc
    records = _parse_jsonl(path, text) if path.suffix == ".jsonl" else _parse_json_list(path, text)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: record {index} is a {type(record).__name__}, expected a JSON object")
    return records


def _parse_json_list(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path} is not valid JSON: {exc} (use a .jsonl name for JSON Lines)") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path} holds a JSON {type(data).__name__}; expected a list of records")
    return data


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: line {number} is not valid JSON: {exc}") from None
    return records


def _text(record: Record, key: str, where: _Where) -> str:
    """A required string field; ROME-style `{"str": ...}` objects are accepted too."""
    if key not in record:
        raise DataFormatError(f"{where}: missing field {key!r} (fields present: {', '.join(sorted(record))})")
    value = record[key]
    if isinstance(value, dict) and isinstance(value.get("str"), str):
        value = value["str"]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_text(record: Record, key: str, where: _Where) -> str | None:
    if record.get(key) is None:
        return None
    return _text(record, key, where)


def _texts(record: Record, key: str, where: _Where, *, required: bool = True) -> tuple[str, ...]:
    """A field holding one string or a list of strings."""
    if key not in record and not required:
        return ()
    value = record.get(key)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    if key not in record:
        raise DataFormatError(f"{where}: missing field {key!r} (fields present: {', '.join(sorted(record))})")
    raise DataFormatError(f"{where}: field {key!r} must be a string or a list of strings")


def _answer(record: Record, key: str, where: _Where) -> str:
    return _text(record, key, where).strip()


def zsre_locality_prompt(loc: str) -> str:
    """The locality prompt for a ZsRE `loc` string: "?" appended, as the reference loaders do.

    The MEND-derived files hold "nq question: who sang ..." without a question mark; the prefix is
    kept (the reference keeps it too). A `loc` that already ends in "?" is left as it is.
    """
    loc = loc.strip()
    return loc if loc.endswith("?") else loc + "?"


def _zsre_example(record: Record, where: _Where) -> EditExample:
    if "alt" in record:  # MEND/EasyEdit form: a counterfactual edit away from the gold answers
        target_new = _answer(record, "alt", where)
        answers = _texts(record, "answers", where, required=False)
        target_true = answers[0].strip() if answers else _optional_text(record, "pred", where)
    elif "ans" in record:  # MALMEN form: the target is the gold answer; the old answer is unknown
        target_new = _answer(record, "ans", where)
        target_true = None
    else:
        raise DataFormatError(
            f"{where}: not a ZsRE record: needs 'alt' (MEND/EasyEdit form) or 'ans' (MALMEN form) "
            f"besides src, rephrase, loc, loc_ans (fields present: {', '.join(sorted(record))})"
        )
    return EditExample(
        prompt=_text(record, "src", where),
        target_new=target_new,
        target_true=target_true.strip() if target_true else None,
        subject=_optional_text(record, "subject", where),
        rephrase_prompts=_texts(record, "rephrase", where),
        locality=((zsre_locality_prompt(_text(record, "loc", where)), _answer(record, "loc_ans", where)),),
    )


def load_zsre(path: Path, limit: int | None = None) -> list[EditExample]:
    """ZsRE examples from `path` (MEND/EasyEdit or MALMEN form), in file order, at most `limit`."""
    return _load(path, limit, _zsre_example)


def _rome_counterfact_example(record: Record, where: _Where) -> EditExample:
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, dict):
        raise DataFormatError(f"{where}: field 'requested_rewrite' must be an object")
    subject = _text(rewrite, "subject", where)
    template = _text(rewrite, "prompt", where)
    if "{}" not in template:
        raise DataFormatError(f"{where}: requested_rewrite.prompt {template!r} has no '{{}}' for the subject")
    target_true = _answer(rewrite, "target_true", where)
    return EditExample(
        # replace, not str.format: a prompt may contain other braces
        prompt=template.replace("{}", subject),
        target_new=_answer(rewrite, "target_new", where),
        target_true=target_true,
        subject=subject,
        rephrase_prompts=_texts(record, "paraphrase_prompts", where, required=False),
        # neighbourhood prompts share the relation and the true object, so their answer is target_true
        locality=tuple((prompt, target_true) for prompt in _texts(record, "neighborhood_prompts", where)),
    )


def _flat_counterfact_example(record: Record, where: _Where) -> EditExample:
    prompts = _texts(record, "locality_prompt", where)
    answers = tuple(a.strip() for a in _texts(record, "locality_ground_truth", where))
    if len(answers) == 1 and len(prompts) > 1:
        answers = answers * len(prompts)
    if len(answers) != len(prompts):
        raise DataFormatError(
            f"{where}: {len(prompts)} locality_prompt entries but {len(answers)} locality_ground_truth entries"
        )
    return EditExample(
        prompt=_text(record, "prompt", where),
        target_new=_answer(record, "target_new", where),
        target_true=_answer(record, "ground_truth", where),
        subject=_optional_text(record, "subject", where),
        rephrase_prompts=_texts(record, "rephrase_prompt", where, required=False),
        locality=tuple(zip(prompts, answers, strict=True)),
    )


def _counterfact_example(record: Record, where: _Where) -> EditExample:
    if "requested_rewrite" in record:
        return _rome_counterfact_example(record, where)
    if "target_new" in record:
        return _flat_counterfact_example(record, where)
    raise DataFormatError(
        f"{where}: not a CounterFact record: needs 'requested_rewrite' (ROME form) or prompt, target_new, "
        f"ground_truth, locality_prompt, locality_ground_truth (EasyEdit form); fields present: "
        f"{', '.join(sorted(record))}"
    )


def load_counterfact(path: Path, limit: int | None = None) -> list[EditExample]:
    """CounterFact examples from `path` (EasyEdit flat or ROME form), in file order, at most `limit`."""
    return _load(path, limit, _counterfact_example)


def _own_example(record: Record, where: _Where) -> EditExample:
    known = {"prompt", "target_new", "target_true", "subject", "rephrase_prompts", "locality"}
    unknown = sorted(set(record) - known)
    if unknown:
        raise DataFormatError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    locality = record.get("locality", [])
    pairs_ok = isinstance(locality, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair) for pair in locality
    )
    if not pairs_ok:
        raise DataFormatError(f"{where}: field 'locality' must be a list of [prompt, answer] string pairs")
    target_true = _optional_text(record, "target_true", where)
    return EditExample(
        prompt=_text(record, "prompt", where),
        target_new=_answer(record, "target_new", where),
        target_true=target_true.strip() if target_true else None,
        subject=_optional_text(record, "subject", where),
        rephrase_prompts=_texts(record, "rephrase_prompts", where, required=False),
        locality=tuple((prompt, answer.strip()) for prompt, answer in locality),
    )


def load_own_examples(path: Path, limit: int | None = None) -> list[EditExample]:
    """Examples stored in this project's canonical form (`EditExample.to_json` objects)."""
    return _load(path, limit, _own_example)


def save_examples(examples: Sequence[EditExample], path: Path) -> None:
    """Write `examples` as a JSON list in the canonical form that `examples:PATH` reads back."""
    path.write_text(json.dumps([e.to_json() for e in examples], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _load(path: Path, limit: int | None, convert: Callable[[Record, _Where], EditExample]) -> list[EditExample]:
    if limit is not None and limit < 0:
        raise DataFormatError(f"limit must be >= 0, got {limit}")
    examples: list[EditExample] = []
    for example in _convert_all(path, convert):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    return examples


def _convert_all(path: Path, convert: Callable[[Record, _Where], EditExample]) -> Iterator[EditExample]:
    for index, record in enumerate(read_records(path)):
        where = _Where(path, index)
        example = convert(record, where)
        if not example.target_new:
            logger.warning("%s: skipped: the new target is empty", where)
            continue
        _check_texts(example, where)
        yield example


def _check_texts(example: EditExample, where: _Where) -> None:
    """Every prompt and answer must be non-empty: an empty one cannot be tokenised into a target."""
    if not example.prompt.strip():
        raise DataFormatError(f"{where}: the prompt is empty")
    if any(not p.strip() for p in example.rephrase_prompts):
        raise DataFormatError(f"{where}: a rephrase prompt is empty")
    for number, (prompt, answer) in enumerate(example.locality):
        if not prompt.strip() or not answer:
            raise DataFormatError(f"{where}: locality pair {number} has an empty prompt or answer")


_FILE_LOADERS: dict[str, Callable[[Path, int | None], list[EditExample]]] = {
    "zsre": load_zsre,
    "counterfact": load_counterfact,
    "examples": load_own_examples,
}


def load_examples(spec: str, *, limit: int | None = None, seed: int = 0) -> list[EditExample]:
    """Examples named by `spec`: "zsre:PATH", "counterfact:PATH", "examples:PATH" or "synthetic:N".

    Files keep their order; `seed` only drives the synthetic generator. At most `limit` examples.
    """
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DataFormatError(
            f"data spec {spec!r} is not KIND:ARGUMENT; use zsre:PATH, counterfact:PATH, examples:PATH or synthetic:N"
        )
    if kind == "synthetic":
        # imported here: the generator's entity lists are only needed when it is used
        from editing.engine.synthetic import synthetic_examples

        try:
            count = int(arg)
        except ValueError:
            raise DataFormatError(f"data spec {spec!r}: synthetic:N needs a whole number, got {arg!r}") from None
        if count < 1:
            raise DataFormatError(f"data spec {spec!r}: the number of synthetic facts must be at least 1")
        return synthetic_examples(count if limit is None else min(count, limit), seed)
    if kind not in _FILE_LOADERS:
        raise DataFormatError(
            f"data spec {spec!r}: unknown kind {kind!r}; use one of {', '.join([*_FILE_LOADERS, 'synthetic'])}"
        )
    return _FILE_LOADERS[kind](Path(arg), limit)


def examples_hash(examples: Sequence[EditExample]) -> str:
    """The sha256 (hex) of the examples' canonical JSON: identifies a training or evaluation set."""
    canonical = json.dumps([e.to_json() for e in examples], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
