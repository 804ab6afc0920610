from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.normalise import content_hash, hash_normalised, normalise_text, prompt_hash


def test_normalise_collapses_unicode_whitespace_and_strips() -> None:
    assert normalise_text("  The\tcapital \u00a0of\n\u2003France  ") == "The capital of France"


def test_normalise_composes_to_nfc_and_keeps_case() -> None:
    decomposed = "Cafe\u0301 in PARIS"
    assert normalise_text(decomposed) == "Caf\u00e9 in PARIS"


def test_content_hash_is_sha256_of_normalised_pair() -> None:
    assert content_hash(" a  b ", "c") == content_hash("a b", "c\n")
    assert content_hash("a b", "c") != content_hash("a", "b c")
    assert content_hash("a", "Paris") != content_hash("a", "paris")
    assert len(content_hash("a", "b")) == 64
    assert prompt_hash(" x  y") == hashlib.sha256(b"x y").hexdigest()


def test_separator_cannot_be_smuggled_into_text() -> None:
    assert content_hash("a\x1fb", "c") == content_hash("a b", "c")


@given(st.text())
def test_normalise_is_idempotent_and_leaves_no_edge_or_double_spaces(text: str) -> None:
    once = normalise_text(text)
    assert normalise_text(once) == once
    assert once == once.strip() and "  " not in once
    assert not any(ch.isspace() and ch != " " for ch in once)


@given(st.text(min_size=1), st.text(min_size=1), st.sampled_from([" ", "\t", "\n", "\u00a0", "\u2003"]))
def test_content_hash_ignores_whitespace_runs(prompt: str, target: str, space: str) -> None:
    padded = space + prompt.replace(" ", space * 2) + space
    assert content_hash(padded, target + space) == content_hash(prompt, target)


@pytest.mark.parametrize(("prompt", "target"), [("a b", "c"), ("Café", "x y"), ("", "t")])
def test_hash_normalised_gives_both_hashes_in_one_pass(prompt: str, target: str) -> None:
    assert hash_normalised(prompt, target) == (content_hash(prompt, target), prompt_hash(prompt))
