"""Request and response bodies of the OpenAI-compatible routes (pydantic), as OpenAI's API reference spells them.

Requests accept the OpenAI parameters the daemon implements, and the harmless ones it ignores
(`user`, `metadata`, `store`, ...). A parameter that would change the answer in a way the daemon
does not implement (`n` other than 1, penalties, tools, `logit_bias`, `echo`, ...) is refused with
`Unsupported`, and an unknown one by validation: a client never gets an answer computed differently
from what it asked. `to_generation` turns a request into a `daemon.served_model.GenerationRequest`.

Responses carry only what the daemon computes; `system_fingerprint` names the version that answered.
`ChatShape` and `CompletionShape` build them from a generation: the whole answer, or a stream's chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from daemon.generation import MAX_TOP_LOGPROBS, FinishReason, Generation, Sampling, TokenLogprob
from daemon.served_model import GenerationRequest, ServedGeneration, ServedVersion

#: The most stop strings one request may give (OpenAI's own limit).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 200
#: The most alternatives a completion's `logprobs` may ask for (OpenAI's own limit).
MAX_COMPLETION_LOGPROBS = 5

#: Parameters accepted only at their neutral value: the value that leaves the answer as the daemon computes it.
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "echo": False,
    "suffix": "",
    "tools": [],
    "functions": [],
    "tool_choice": "none",
    "function_call": "none",
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
}


class Unsupported(ValueError):
    """A parameter set to a value the daemon does not implement; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


StopStrings = Annotated[
    str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None,
    Field(description="Up to 4 strings; the text ends before the first one generated."),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationBody(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=500)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: StopStrings = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Harmless: accepted and ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Refused unless neutral (NEUTRAL).
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise Unsupported("stop", f"stop: at most {MAX_STOP_STRINGS} strings, none of them empty")
        return tuple(stops)

    def check_supported(self) -> None:
        """Unsupported for the first parameter set to a value other than its neutral one."""
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name, None)
            if value is not None and value != neutral:
                raise Unsupported(name, f"{name}: only {neutral!r} is supported by this server (given {value!r})")

    def sampling(self, max_tokens: int, logprobs: int | None) -> Sampling:
        self.check_supported()
        return Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stop_strings(),
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def token_budget(requested: int | None, limit: int, param: str) -> tuple[int, bool]:
    """(max_tokens, fit_to_context): the client's budget, at most `limit` (api.max_new_tokens), or `limit` fitted."""
    if requested is None:
        return limit, True
    if requested > limit:
        raise Unsupported(param, f"{param}: at most {limit} tokens per request on this server (api.max_new_tokens)")
    return requested, False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; `developer` is OpenAI's newer name for `system` and is rendered as one."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def rendered(self) -> tuple[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ("system" if self.role == "developer" else self.role), content


class ChatCompletionRequest(_GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    def to_generation(self, token_limit: int) -> GenerationRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs: needs logprobs set to true")
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens, fit = token_budget(requested, token_limit, param)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        messages = tuple(message.rendered() for message in self.messages)
        return GenerationRequest(self.model, messages, self.sampling(max_tokens, logprobs), fit)


class CompletionRequest(_GenerationBody):
    """POST /v1/completions: one raw prompt (a string, or a list holding one string)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def to_generation(self, token_limit: int) -> GenerationRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise Unsupported("prompt", "prompt: one prompt per request on this server (a string or a list of one)")
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        max_tokens, fit = token_budget(self.max_tokens, token_limit, "max_tokens")
        return GenerationRequest(self.model, prompt, self.sampling(max_tokens, self.logprobs), fit)


# --- responses -------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob]
    refusal: None = None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(_Out):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class _Answer(_Out):
    """What every answer and chunk starts with; `system_fingerprint` names the version that answered."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(_Answer):
    """A completion, or (streamed) one chunk of it."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    """The served model; `model_version` and `weights_sha256` say which version of its weights answers now."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ked"
    model_version: int
    weights_sha256: str
    max_model_len: int | None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    """Every error of the OpenAI routes."""

    error: ErrorDetail


# --- from a generation to the two response shapes --------------------------------------------------


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _usage(generation: Generation) -> Usage:
    used = generation.prompt_tokens + generation.completion_tokens
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens, total_tokens=used)


@dataclass
class _Shape:
    """One response's identity (OpenAI's `id` and `created`) and whether it reports log-probabilities."""

    id: str
    created: int
    with_logprobs: bool

    def _head(self, served: ServedVersion) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": served.model_id, "system_fingerprint": served.fingerprint}


@dataclass
class ChatShape(_Shape):
    """Chat completions: the whole answer, or the chunks of a stream (role first, finish reason last)."""

    def answer(self, result: ServedGeneration) -> ChatCompletion:
        generation = result.generation
        choice = ChatChoice(
            message=AssistantMessage(content=generation.text),
            logprobs=self._logprobs(generation.logprobs),
            finish_reason=generation.finish_reason,
        )
        return ChatCompletion(**self._head(result.served), choices=[choice], usage=_usage(generation))

    def opening(self, served: ServedVersion) -> list[BaseModel]:
        return [self._chunk(served, ChatChunkChoice(delta=ChatDelta(role="assistant", content="")))]

    def piece(self, served: ServedVersion, delta: str, logprobs: Sequence[TokenLogprob]) -> BaseModel:
        return self._chunk(served, ChatChunkChoice(delta=ChatDelta(content=delta), logprobs=self._logprobs(logprobs)))

    def closing(self, result: ServedGeneration, include_usage: bool) -> list[BaseModel]:
        last = self._chunk(result.served, ChatChunkChoice(delta=ChatDelta(), finish_reason=result.generation.finish_reason))
        if not include_usage:
            return [last]
        return [last, ChatCompletionChunk(**self._head(result.served), choices=[], usage=_usage(result.generation))]

    def _chunk(self, served: ServedVersion, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self._head(served), choices=[choice])

    def _logprobs(self, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=step.token, logprob=step.logprob, bytes=_bytes(step.token),
                    top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=_bytes(t)) for t, lp in step.top],
                )
                for step in logprobs
            ]
        )


@dataclass
class CompletionShape(_Shape):
    """Completions: the whole answer, or the chunks of a stream (finish reason last); keeps the text offsets."""

    _offset: int = 0

    def answer(self, result: ServedGeneration) -> Completion:
        generation = result.generation
        choice = CompletionChoice(
            text=generation.text, logprobs=self._logprobs(generation.logprobs), finish_reason=generation.finish_reason
        )
        return Completion(**self._head(result.served), choices=[choice], usage=_usage(generation))

    def opening(self, served: ServedVersion) -> list[BaseModel]:
        return []

    def piece(self, served: ServedVersion, delta: str, logprobs: Sequence[TokenLogprob]) -> BaseModel:
        return Completion(**self._head(served), choices=[CompletionChoice(text=delta, logprobs=self._logprobs(logprobs))])

    def closing(self, result: ServedGeneration, include_usage: bool) -> list[BaseModel]:
        last = CompletionChoice(text="", finish_reason=result.generation.finish_reason)
        usage = _usage(result.generation) if include_usage else None
        return [Completion(**self._head(result.served), choices=[last], usage=usage)]

    def _logprobs(self, logprobs: Sequence[TokenLogprob]) -> CompletionLogprobs | None:
        if not self.with_logprobs:
            return None
        offsets = []
        for step in logprobs:
            offsets.append(self._offset)
            self._offset += len(step.token)
        return CompletionLogprobs(
            tokens=[step.token for step in logprobs],
            token_logprobs=[step.logprob for step in logprobs],
            top_logprobs=[dict(step.top) for step in logprobs],
            text_offset=offsets,
        )


ResponseShape = ChatShape | CompletionShape


# --- errors ----------------------------------------------------------------------------------------

#: OpenAI's error `type`, and the `code` used when none is more precise, by HTTP status.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "unavailable"),
}


class OpenAIError(Exception):
    """An error answer of the OpenAI routes: HTTP `status` and the body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        kind, default_code = ERROR_KINDS.get(status, ("server_error", None))
        self.detail = ErrorDetail(message=message, type=kind, param=param, code=code or default_code)

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.detail).model_dump()
