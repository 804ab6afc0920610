"""Record shapes: our fact format and the standard benchmark forms, recognised automatically.

`canonical(record)` returns the record in our own field names plus a map from those names back
to the names the record used, so that an error in a ZsRE record says `alt: ...`, not
`target_new: ...`. Recognition, first match wins:

1. `requested_rewrite` present: ROME CounterFact (`requested_rewrite.prompt` with `{}` for the
   subject, `target_new.str`, `target_true.str`, `paraphrase_prompts`, `neighborhood_prompts`).
2. `src` or `alt` present: MEND/EasyEdit ZsRE (`src`, `alt`, `answers`/`pred`, `rephrase`, `loc`,
   `loc_ans`, `subject`).
3. `rephrase_prompt`, `locality_prompt`, `locality_ground_truth` or `case_id` present: EasyEdit's
   flat CounterFact.
4. Otherwise our own format, where unknown keys are an error.

Benchmark shapes ignore fields we do not use (`cond`, `portability`, `attribute_prompts`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ingest.errors import RecordError

NATIVE_FIELDS = (
    "prompt", "target_new", "subject", "ground_truth", "rephrase_prompts", "locality", "id", "observed_at",
)
COUNTERFACT_MARKERS = ("rephrase_prompt", "locality_prompt", "locality_ground_truth", "case_id")


@dataclass(frozen=True)
class Canonical:
    """A record in our field names; `names` maps a canonical dotted path prefix to the record's own."""

    shape: str  #: "fact", "zsre", "counterfact" or "rome"
    fields: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)

    def original_name(self, path: str) -> str:
        """The record's own name for canonical dotted `path` (longest matching prefix wins)."""
        best = ""
        for prefix in self.names:
            if (path == prefix or path.startswith(prefix + ".")) and len(prefix) > len(best):
                best = prefix
        if not best:
            return path
        return self.names[best] + path[len(best) :]


def _as_list(value: Any) -> Any:
    """A string becomes a one-item list; anything else is left for validation to judge."""
    return [value] if isinstance(value, str) else value


def _passthrough(record: dict[str, Any], out: dict[str, Any]) -> None:
    for key in ("observed_at",):
        if key in record:
            out[key] = record[key]
    if "id" in record:
        out["id"] = record["id"]
    elif "case_id" in record:
        out["id"] = record["case_id"]


def _zsre(record: dict[str, Any]) -> Canonical:
    for required in ("src", "alt"):
        if required not in record:
            raise RecordError(required, "required in a ZsRE record (src = prompt, alt = new target)")
    out: dict[str, Any] = {"prompt": record["src"], "target_new": record["alt"]}
    names = {"prompt": "src", "target_new": "alt", "rephrase_prompts": "rephrase", "id": "id"}
    if "subject" in record:
        out["subject"] = record["subject"]
    answers = record.get("answers")
    if answers is not None:
        if not isinstance(answers, list):
            raise RecordError("answers", "must be a list of strings")
        if answers:
            out["ground_truth"] = answers[0]
            names["ground_truth"] = "answers.0"
    if "ground_truth" not in out and "pred" in record:
        out["ground_truth"] = record["pred"]
        names["ground_truth"] = "pred"
    if "rephrase" in record:
        out["rephrase_prompts"] = _as_list(record["rephrase"])
    if ("loc" in record) != ("loc_ans" in record):
        raise RecordError("loc_ans" if "loc" in record else "loc", "loc and loc_ans must be given together")
    if "loc" in record:
        out["locality"] = [{"prompt": record["loc"], "answer": record["loc_ans"]}]
        names.update({"locality.0.prompt": "loc", "locality.0.answer": "loc_ans", "locality": "loc"})
    if "case_id" in record:
        names["id"] = "case_id"
    _passthrough(record, out)
    return Canonical("zsre", out, names)


def _pairs(prompts: Any, answers: Any) -> Any:
    """Zip locality prompts with answers (each a string or a list of strings)."""
    prompts, answers = _as_list(prompts), _as_list(answers)
    if not isinstance(prompts, list) or not isinstance(answers, list):
        return prompts if not isinstance(prompts, list) else answers  # let validation name the type
    if len(prompts) != len(answers):
        raise RecordError(
            "locality_ground_truth",
            f"{len(answers)} answers for {len(prompts)} locality prompts; give one answer per prompt",
        )
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]


def _counterfact(record: dict[str, Any]) -> Canonical:
    for required in ("prompt", "target_new"):
        if required not in record:
            raise RecordError(required, "required in a CounterFact record")
    out: dict[str, Any] = {"prompt": record["prompt"], "target_new": record["target_new"]}
    names = {"rephrase_prompts": "rephrase_prompt", "locality": "locality_prompt",
             "locality.0.answer": "locality_ground_truth", "id": "case_id" if "case_id" in record else "id"}
    for key in ("subject", "ground_truth"):
        if key in record:
            out[key] = record[key]
    if "rephrase_prompt" in record:
        out["rephrase_prompts"] = _as_list(record["rephrase_prompt"])
    if ("locality_prompt" in record) != ("locality_ground_truth" in record):
        missing = "locality_ground_truth" if "locality_prompt" in record else "locality_prompt"
        raise RecordError(missing, "locality_prompt and locality_ground_truth must be given together")
    if "locality_prompt" in record:
        out["locality"] = _pairs(record["locality_prompt"], record["locality_ground_truth"])
    _passthrough(record, out)
    return Canonical("counterfact", out, names)


def _text_of(parent: dict[str, Any], key: str, where: str) -> Any:
    """`parent[key]`, or `parent[key]["str"]` (ROME wraps targets as {"str": ..., "id": ...})."""
    if key not in parent:
        raise RecordError(f"{where}.{key}", "required in a ROME requested_rewrite")
    value = parent[key]
    if isinstance(value, dict):
        if "str" not in value:
            raise RecordError(f"{where}.{key}.str", "required (the target text)")
        return value["str"]
    return value


def _rome(record: dict[str, Any]) -> Canonical:
    rewrite = record["requested_rewrite"]
    if isinstance(rewrite, list) and len(rewrite) == 1:
        rewrite = rewrite[0]  # some exports wrap the single rewrite in a list
    if not isinstance(rewrite, dict):
        raise RecordError("requested_rewrite", "must be an object with prompt, subject, target_new, target_true")
    template, subject = rewrite.get("prompt"), rewrite.get("subject")
    if not isinstance(template, str):
        raise RecordError("requested_rewrite.prompt", "required: a string with '{}' where the subject goes")
    if not isinstance(subject, str):
        raise RecordError("requested_rewrite.subject", "required: the subject string")
    if "{}" not in template:
        raise RecordError("requested_rewrite.prompt", "must contain '{}' where the subject goes")
    out: dict[str, Any] = {
        "prompt": template.replace("{}", subject),  # replace, not format: the text is untrusted
        "subject": subject,
        "target_new": _text_of(rewrite, "target_new", "requested_rewrite"),
    }
    names = {"target_new": "requested_rewrite.target_new.str", "ground_truth": "requested_rewrite.target_true.str",
             "subject": "requested_rewrite.subject", "prompt": "requested_rewrite.prompt", "rephrase_prompts": "paraphrase_prompts",
             "locality": "neighborhood_prompts", "id": "case_id" if "case_id" in record else "id"}
    if "target_true" in rewrite:
        out["ground_truth"] = _text_of(rewrite, "target_true", "requested_rewrite")
    if "paraphrase_prompts" in record:
        out["rephrase_prompts"] = _as_list(record["paraphrase_prompts"])
    neighbours = _as_list(record.get("neighborhood_prompts", []))
    if not isinstance(neighbours, list):
        out["locality"] = neighbours  # validation names the wrong type
    elif neighbours and "ground_truth" in out:
        # Neighbourhood prompts should still produce the true target after the edit.
        out["locality"] = _pairs(neighbours, [out["ground_truth"]] * len(neighbours))
    _passthrough(record, out)
    return Canonical("rome", out, names)


def canonical(record: Any) -> Canonical:
    """Recognise the shape of one parsed JSON record and return it in canonical field names.

    Raises RecordError when the record is not an object or misses a field its shape requires.
    """
    if not isinstance(record, dict):
        raise RecordError("record", f"expected a JSON object, got {_json_type(record)}")
    if "requested_rewrite" in record:
        return _rome(record)
    if "src" in record or "alt" in record:
        return _zsre(record)
    if any(marker in record for marker in COUNTERFACT_MARKERS):
        return _counterfact(record)
    unknown = sorted(set(record) - set(NATIVE_FIELDS))
    if unknown:
        raise RecordError(
            unknown[0][:80], f"unknown field (allowed: {', '.join(NATIVE_FIELDS)}; or a ZsRE/CounterFact record)"
        )
    return Canonical("fact", dict(record))


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
