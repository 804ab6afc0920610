"""Domain errors of `ingest/`. Messages name the field or place and what is wrong with it."""

from __future__ import annotations


class IngestError(RuntimeError):
    """Base class of ingestion errors."""


class RecordError(IngestError, ValueError):
    """One input record cannot become a fact. `field` is the dotted field path ('record' for the whole)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DocumentError(IngestError, ValueError):
    """A whole input (file, response body, feed) cannot be read; no record in it is usable."""


class FetchError(IngestError):
    """An HTTP fetch failed: connection, timeout, status, size limit or a refused redirect."""


class FeedUnavailable(FetchError):
    """A feed could not be fetched or parsed; the poll is recorded as failed and retried with back-off."""


class UnsafePath(IngestError):
    """A drop-folder entry is not a regular file inside the folder (symlink, device, directory...)."""
