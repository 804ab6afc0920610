"""Regenerates the bad-input corpus in ./bad and its manifest.json (expected rejections per file).

    python tests/ingest/data/make_bad_corpus.py

Every JSONL case puts its bad line between two good ones, so the test can show that the good data
around it survives. The limits the expectations assume are in tests/ingest/test_bad_inputs.py.
"""

import gzip
import json
from pathlib import Path

out = Path(__file__).parent / "bad"
for p in out.iterdir():
    p.unlink()
manifest = {}

def good(name, i):
    return json.dumps({"prompt": f"Corpus fact {name} {i} is", "target_new": f"kept {i}"}).encode()

def line_case(name, bad: bytes, reason, what, position="line 2"):
    data = good(name, 1) + b"\n" + bad + b"\n" + good(name, 2) + b"\n"
    (out / f"{name}.jsonl").write_bytes(data)
    manifest[f"{name}.jsonl"] = {"what": what, "accepted": 2, "destination": "processed",
                                 "rejections": [[position, reason]]}

def j(obj):
    return json.dumps(obj, ensure_ascii=False).encode()

def F(**kw):
    return j({"prompt": "The corpus prompt is", "target_new": "new", **kw})

line_case("nul_byte", b'{"prompt": "a\x00b", "target_new": "t"}', "record: NUL byte at column 14", "raw NUL byte")
line_case("nul_escape", b'{"prompt": "a\\u0000b", "target_new": "t"}', "prompt: contains control character U+0000 at position 2", "NUL as a JSON escape")
line_case("latin1", b'{"prompt": "caf\xe9 owner is", "target_new": "t"}', "record: not valid UTF-8: byte 0xe9 at column 16", "Latin-1 byte")
line_case("overlong_utf8", b'{"prompt": "\xc0\xaf", "target_new": "t"}', "record: not valid UTF-8: byte 0xc0 at column 13", "overlong UTF-8 encoding of '/'")
line_case("lone_surrogate", b'{"prompt": "p", "target_new": "a\\ud800"}', "target_new: contains an unpaired surrogate U+D800 at position 2", "unpaired surrogate escape")
line_case("empty_target", F(target_new=""), "target_new: must not be empty or whitespace", "empty target")
line_case("whitespace_target", F(target_new="\u2003 \t"), "target_new: must not be empty or whitespace", "Unicode whitespace target")
line_case("target_equals_truth", F(target_new="Paris", ground_truth="Paris"), "target_new: equals ground_truth 'Paris'; nothing to edit", "target equals ground truth")
line_case("target_equals_truth_case", F(target_new="paris ", ground_truth="Paris"), "target_new: equals ground_truth 'Paris'; nothing to edit", "target equals ground truth up to case and spaces")
line_case("missing_prompt", j({"target_new": "t"}), "prompt: required", "no prompt")
line_case("missing_target", j({"prompt": "p"}), "target_new: required", "no target")
line_case("number_target", F(target_new=42), "target_new: Input should be a valid string", "number as target")
line_case("null_prompt", j({"prompt": None, "target_new": "t"}), "prompt: Input should be a valid string", "null prompt")
line_case("array_record", b'["p", "t"]', "record: expected a JSON object, got an array", "array instead of object")
line_case("string_record", b'"The sky is green"', "record: expected a JSON object, got a string", "string instead of object")
line_case("truncated_json", b'{"prompt": "p", "target_new": "t"', "record: invalid JSON: Expecting ',' delimiter at column 34", "unterminated object")
line_case("trailing_comma", b'{"prompt": "p", "target_new": "t",}', "record: invalid JSON: Expecting property name enclosed in double quotes at column 35", "trailing comma")
line_case("single_quotes", b"{'prompt': 'p', 'target_new': 't'}", "record: invalid JSON: Expecting property name enclosed in double quotes at column 2", "single-quoted JSON")
line_case("duplicate_keys", b'{"prompt": "p", "target_new": "a", "target_new": "b"}', "record: invalid JSON: key 'target_new' appears twice in one object", "duplicate key")
line_case("nan", b'{"prompt": "p", "target_new": NaN}', "record: invalid JSON: NaN is not valid JSON", "NaN literal")
deep = {"prompt": "p", "target_new": "t", "locality": [{"prompt": "q", "answer": "a"}]}
inner = "x"
for _ in range(30):
    inner = [inner]
line_case("deep_nesting", j({"prompt": "p", "target_new": "t", "extra": inner}), "record: JSON nested 31 levels deep; the limit is 8 (ingest.limits.max_depth)", "30 nested arrays")
line_case("parser_depth_bomb", b"[" * 1500 + b"]" * 1500, "record: JSON nested too deeply to parse", "1,500 nested arrays")
line_case("enormous_line", j({"prompt": "p", "target_new": "x" * 5000}), "record: line is 5033 bytes, longer than the limit of 4096 (ingest.limits.max_line_bytes)", "5 kB line")
line_case("long_prompt", F(prompt="p" * 300), "prompt: is 300 characters; the limit is 200", "prompt over the limit")
line_case("long_target", F(target_new="t" * 150), "target_new: is 150 characters; the limit is 100", "target over the limit")
line_case("unknown_field", F(colour="red"), "colour: unknown field (allowed: prompt, target_new, subject, ground_truth, rephrase_prompts, locality, id, observed_at; or a ZsRE/CounterFact record)", "unknown field")
line_case("control_char", F(subject="bell\u0007"), "subject: contains control character U+0007 at position 5", "control character in subject")
line_case("bad_observed_at", F(observed_at="last Tuesday"), "observed_at: 'last Tuesday' is not an ISO 8601 timestamp like 2026-11-21T10:00:00Z", "unparseable time")
line_case("naive_observed_at", F(observed_at="2026-11-21T10:00:00"), "observed_at: '2026-11-21T10:00:00' has no timezone; add 'Z' or an offset such as +01:00", "time without timezone")
line_case("bad_locality", F(locality=[{"prompt": "q"}]), "locality.0.answer: required", "locality pair without answer")
line_case("locality_not_list", F(locality={"prompt": "q", "answer": "a"}), "locality: Input should be a valid list", "locality as object")
line_case("rephrase_number", F(rephrase_prompts=[1]), "rephrase_prompts.0: Input should be a valid string", "number among rephrases")
line_case("too_many_rephrases", F(rephrase_prompts=[f"r{i}" for i in range(9)]), "rephrase_prompts: has 9 items; the limit is 8 (ingest.limits.max_list_items)", "too many rephrases")
line_case("bool_id", F(id=True), "id: must be a string or an integer", "boolean id")
line_case("zsre_empty_alt", j({"src": "Who made X?", "alt": " ", "answers": ["Y"], "loc": "nq question: q", "loc_ans": "a"}), "alt: must not be empty or whitespace", "ZsRE record with empty alt")
line_case("zsre_loc_without_ans", j({"src": "Who made X?", "alt": "Z", "loc": "nq question: q"}), "loc_ans: loc and loc_ans must be given together", "ZsRE loc without loc_ans")
line_case("counterfact_locality_mismatch", j({"case_id": 1, "prompt": "X is in", "target_new": "Asia", "locality_prompt": ["a", "b"], "locality_ground_truth": ["c"]}), "locality_ground_truth: 1 answers for 2 locality prompts; give one answer per prompt", "CounterFact locality lists of different lengths")
line_case("rome_no_placeholder", j({"case_id": 2, "requested_rewrite": {"prompt": "The capital is", "subject": "S", "target_new": {"str": "x"}, "target_true": {"str": "y"}}}), "requested_rewrite.prompt: must contain '{}' where the subject goes", "ROME prompt without {}")
line_case("rome_missing_target_str", j({"case_id": 3, "requested_rewrite": {"prompt": "{} is", "subject": "S", "target_new": {"id": "Q1"}}}), "requested_rewrite.target_new.str: required (the target text)", "ROME target without str")
line_case("format_injection", j({"requested_rewrite": {"prompt": "{} {0.__class__}", "subject": "S", "target_new": {"str": ""}}}), "requested_rewrite.target_new.str: must not be empty or whitespace", "ROME prompt with format fields (not evaluated)")

# partly bad JSON array
arr = [json.loads(good("array_mixed", 1)), {"prompt": "p", "target_new": ""}, json.loads(good("array_mixed", 2))]
(out / "array_mixed.json").write_bytes(j(arr))
manifest["array_mixed.json"] = {"what": "JSON array with one bad item", "accepted": 2, "destination": "processed", "rejections": [["item 2", "target_new: must not be empty or whitespace"]]}

def whole(name, data, reason, what, n=0):
    (out / name).write_bytes(data)
    manifest[name] = {"what": what, "accepted": n, "destination": "rejected" if n == 0 else "processed", "rejections": [[None, reason]]}

whole("not_json.json", b'[{"prompt": "p", "target_new": "t"}, {"prompt": ', "file: invalid JSON: Expecting value at line 1 column 49", "JSON array cut short")
whole("top_level_string.json", b'"facts"', "file: expected a JSON list of facts or an object, not str", "top-level string")
whole("facts_not_list.json", b'{"facts": "none"}', "file: 'facts' must be a list of fact objects, not str", "facts key not a list")
whole("empty.jsonl", b"", "file: empty.jsonl is an empty file (0 bytes); it contains no records", "empty file")
whole("blank_lines.jsonl", b"\n  \n\t\n", "file: contains no records", "only blank lines")
whole("bad_gzip.jsonl.gz", b"this is not gzip at all", "file: not valid gzip data: Error -3 while decompressing data: incorrect header check", "not gzip")
whole("gzip_bomb.jsonl.gz", gzip.compress(b" " * 1_000_000, 9, mtime=0), "file: decompresses to more than 16384 bytes (ingest.limits.max_file_bytes)", "1 MB of spaces in 1 kB of gzip")
whole("truncated.jsonl.gz", gzip.compress(good("truncated", 1) + b"\n", mtime=0)[:-12], "file: gzip data is truncated", "gzip cut short")
whole("too_big.jsonl", (good("too_big", 1) + b"\n") * 400, "file: is 25200 bytes; the limit is 16384 (ingest.limits.max_file_bytes)", "file over the size limit")
whole("utf16.json", json.dumps([{"prompt": "p", "target_new": "t"}]).encode("utf-16"), "file: not valid UTF-8: byte 0xff at offset 0", "UTF-16 JSON file")
whole("spreadsheet.csv", b"prompt,target_new\np,t\n", "file: unsupported file type; use .jsonl, .json, .jsonl.gz", "unsupported extension")
(out / "all_bad.jsonl").write_bytes(b"{\n[1]\n")
manifest["all_bad.jsonl"] = {"what": "every line bad", "accepted": 0, "destination": "rejected", "rejections": [["line 1", "record: invalid JSON: Expecting property name enclosed in double quotes at column 2"], ["line 2", "record: expected a JSON object, got an array"]]}
(out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
print(len(manifest))
