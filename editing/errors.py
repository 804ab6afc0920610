"""Domain errors of `editing/`. Messages say what went wrong and what to do."""

from __future__ import annotations


class EditingError(RuntimeError):
    """Base class of editing errors."""


class ModelLoadError(EditingError):
    """The model or tokenizer could not be loaded from the configured source."""


class ModelMismatch(EditingError):
    """A model, module set or checkpoint does not fit what it is used with."""


class DataFormatError(EditingError, ValueError):
    """An edit data file, record or data-set spec is not in an accepted format (see docs/data.md)."""


class ProbeDataError(EditingError, ValueError):
    """A probe set (directory, file, record or Hugging Face dataset) cannot be used for the gate's probes."""


class CheckpointError(EditingError):
    """An editor checkpoint is missing, incomplete or unreadable."""
