"""The model as the OpenAI routes serve it: one whole version of the live weights per answer, and which.

`ServedModel` joins the loaded model and its `WeightState`: `pinned()` holds the weights' read lock
and says which version it holds (`ServedVersion`: the model id, the ledger version, the weights hash);
`generate()` renders the prompt and runs `daemon.generation.generate` inside one pin, so a commit or
a revert waits for it to finish and the answer never mixes two versions. The hash is computed once
per version (under the lock, where it is exactly that version's) and remembered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from daemon.generation import (
    Generation,
    Sampling,
    TextSink,
    chat_prompt,
    check_context,
    context_length,
    generate,
    text_prompt,
)
from daemon.service_view import NotFound
from editing.model.loading import LoadedModel
from editing.state.weights import WeightState

#: Versions whose weights hash is remembered; older ones are hashed again if they come back (a revert).
REMEMBERED_HASHES = 64


@dataclass(frozen=True)
class ServedVersion:
    """What answered: the model id clients name, the ledger version of its live weights and their sha256."""

    model_id: str
    version: int
    weights_sha256: str
    context_length: int | None

    @property
    def fingerprint(self) -> str:
        """The OpenAI `system_fingerprint`: ``ked-v<version>-<first 12 hex digits of the weights hash>``."""
        return f"ked-v{self.version}-{self.weights_sha256[:12]}"


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to answer: raw text, or (role, content) chat messages for the model's chat template.

    With `fit_to_context` (no token budget given by the client) `sampling.max_tokens` shrinks to what
    the context leaves after the prompt; otherwise a prompt and budget that do not fit are refused.
    """

    model: str
    prompt: str | tuple[tuple[str, str], ...]
    sampling: Sampling
    fit_to_context: bool = False


@dataclass(frozen=True)
class ServedGeneration:
    served: ServedVersion
    generation: Generation


class GenerationSink(TextSink, Protocol):
    """A `TextSink` that also learns which version answers, before the first piece of text."""

    def pinned(self, served: ServedVersion) -> None: ...


def served_model_id(loaded: LoadedModel) -> str:
    """The id clients name: a hub id as given, a local file or folder by its name (the default model: its GGUF file's)."""
    if loaded.source == "default" and loaded.gguf_file:
        return Path(loaded.gguf_file).stem
    path = Path(loaded.source)
    if path.is_file():
        return path.stem
    return path.name if path.is_dir() else loaded.source


class ServedModel:
    """A loaded model and its live weights, served one whole version at a time. Thread-safe."""

    def __init__(self, loaded: LoadedModel, weights: WeightState) -> None:
        self.loaded = loaded
        self.weights = weights
        self.model_id = served_model_id(loaded)
        self._hashes: dict[int, str] = {}

    @contextmanager
    def pinned(self) -> Iterator[ServedVersion]:
        """Hold the live weights still (the read lock) and say which version they are."""
        with self.weights.reading() as version:
            yield ServedVersion(self.model_id, version, self._weights_sha256(version), context_length(self.loaded.model))

    def _weights_sha256(self, version: int) -> str:
        # Called under the read lock, where the weights are exactly `version`'s; a version number is never
        # reused for other weights (a revert rebuilds the very weights it names, checked by this hash).
        known = self._hashes.get(version)
        if known is None:
            if len(self._hashes) >= REMEMBERED_HASHES:
                self._hashes.clear()
            known = self._hashes[version] = self.weights.weights_sha256()
        return known

    def generate(self, request: GenerationRequest, sink: GenerationSink | None = None) -> ServedGeneration:
        """Answer `request` from one version; NotFound for another model id, InvalidInput for a prompt it cannot take."""
        if request.model != self.model_id:
            raise NotFound(f"model: this daemon serves {self.model_id!r}, not {request.model!r} (see GET /v1/models)")
        prompt_ids = self._prompt_ids(request.prompt)
        sampling = self._budget(request, len(prompt_ids))
        with self.pinned() as served:
            if sink is not None:
                sink.pinned(served)
            generation = generate(self.loaded.model, self.loaded.tokenizer, prompt_ids, sampling, sink)
        return ServedGeneration(served, generation)

    def _prompt_ids(self, prompt: str | Sequence[tuple[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            return text_prompt(self.loaded.tokenizer, prompt)
        return chat_prompt(self.loaded.tokenizer, prompt)

    def _budget(self, request: GenerationRequest, prompt_tokens: int) -> Sampling:
        sampling = request.sampling
        context = context_length(self.loaded.model)
        if request.fit_to_context and context is not None and prompt_tokens < context:
            sampling = replace(sampling, max_tokens=min(sampling.max_tokens, context - prompt_tokens))
        check_context(self.loaded.model, prompt_tokens, sampling.max_tokens, "max_tokens")
        return sampling
