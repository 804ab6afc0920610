"""Domain errors of the edit ledger. Messages name the fact, version or source and say what to do."""

from __future__ import annotations


class LedgerError(RuntimeError):
    """Base class: the ledger refused an operation."""


class IllegalTransition(LedgerError):
    """A fact status change that the state machine does not allow (see `store.states`)."""


class UnknownFact(LedgerError, LookupError):
    """A fact id that is not in the ledger."""


class UnknownVersion(LedgerError, LookupError):
    """A commit version that is not in the ledger, or not on the active chain."""


class LedgerUnavailable(LedgerError):
    """The database cannot be reached or upgraded; the message carries the URL (without password)."""


class UnknownSource(LedgerError, LookupError):
    """A source name that is not in the ledger."""


class InvalidFact(LedgerError, ValueError):
    """A fact that cannot be stored (empty after normalisation, naive timestamp); names its origin."""


class StaleVersion(LedgerError):
    """A commit prepared for another version or parent than the ledger's (a revert landed meanwhile)."""
