"""Text normalisation and the content hash that deduplicates facts.

Rules (also in docs/ledger.md): Unicode NFC; every run of whitespace (any Unicode space, tab,
newline) becomes one ASCII space; leading and trailing whitespace is removed. Case and punctuation
are kept: "Paris" and "paris" are different targets, because a model edit towards either differs.
"""

from __future__ import annotations

import hashlib
import unicodedata

# The unit separator counts as whitespace for str.split(), so it never survives normalisation and
# ("a b", "c") and ("a", "b c") hash differently.
_SEPARATOR = "\x1f"


def normalise_text(s: str) -> str:
    """NFC, internal whitespace collapsed to single spaces, stripped. Case is kept."""
    if not s.isascii():  # ASCII text is already NFC; skipping the call halves the cost of ingest
        s = unicodedata.normalize("NFC", s)
    return " ".join(s.split())


def prompt_hash(prompt: str) -> str:
    """sha256 hex of the normalised prompt: the key under which newer targets supersede older ones."""
    return hash_normalised_prompt(normalise_text(prompt))


def content_hash(prompt: str, target_new: str) -> str:
    """sha256 hex of the normalised (prompt, target_new) pair: two facts with equal hashes are one fact."""
    return hash_normalised_pair(normalise_text(prompt), normalise_text(target_new))


def hash_normalised_prompt(prompt: str) -> str:
    """`prompt_hash` of a prompt that is already normalised (the ledger's fast path)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def hash_normalised_pair(prompt: str, target_new: str) -> str:
    """`content_hash` of a pair that is already normalised (the ledger's fast path)."""
    return hashlib.sha256((prompt + _SEPARATOR + target_new).encode("utf-8")).hexdigest()


def hash_normalised(prompt: str, target_new: str) -> tuple[str, str]:
    """(`content_hash`, `prompt_hash`) of a pair that is already normalised, in one pass over the prompt."""
    digest = hashlib.sha256(prompt.encode("utf-8"))
    phash = digest.hexdigest()  # hexdigest leaves the state as it was, so the pair hash continues from here
    digest.update((_SEPARATOR + target_new).encode("utf-8"))
    return digest.hexdigest(), phash
