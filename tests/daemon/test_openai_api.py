"""The OpenAI-compatible routes, driven by the official `openai` client against a running API server.

The server is the daemon's app (`create_app`) on a real loopback port over the daemon's own view
(`DaemonView`): a real SQLite ledger, and a tiny Llama loaded from a local directory as the daemon
loads `[model] source`, with its live weights in a `WeightState`. Versions are published with
`WeightState.stage(...)` and `publish(...)`, the step through which the daemon's commits and reverts
change the live weights. The tiny tokenizer gets a plain chat template ("role: content" lines).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from daemon.config import ApiConfig
from daemon.generation import TokenLogprob, chat_prompt
from daemon.http_server import HttpServer
from daemon.ledger_view import LedgerView
from daemon.metrics import Metrics
from daemon.served_model import GenerationRequest, GenerationSink, ServedGeneration, ServedVersion
from daemon.view import DaemonView
from editing.config import ModelConfig
from editing.model.loading import LoadedModel, load_model
from editing.state.weights import WeightState
from ingest.config import IngestConfig
from tests.daemon.test_model_state import EDIT_MODULES, tiny_model_dir_fixture

__all__ = ["tiny_model_dir_fixture"]  # fixture

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
QUESTION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]
READ_TOKEN = "read-token-for-tests"
WRITE_TOKEN = "write-token-for-tests"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    model = load_model(ModelConfig(source=str(tiny_model_dir), device="cpu"), cache_dir=tmp_path_factory.mktemp("cache"))
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


@pytest.fixture
def weights(loaded: LoadedModel) -> Iterator[WeightState]:
    state = WeightState(loaded.model, EDIT_MODULES)
    yield state
    state.publish(state.stage(0, []))  # the base weights again, whatever the test published


@pytest.fixture
def view(make_ledger: Callable[[], Any], loaded: LoadedModel, weights: WeightState, fresh_metrics: Metrics) -> DaemonView:
    sessions = make_ledger()
    return DaemonView(LedgerView(sessions, IngestConfig.model_validate({}), fresh_metrics), sessions, model=loaded, weights=weights)


@pytest.fixture
def start(view: DaemonView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]) -> Callable[..., HttpServer]:
    """`start(**api_fields)`: the daemon's app over `view`, generous rate limits unless the fields say otherwise."""

    def run(**fields: Any) -> HttpServer:
        return serve_api(view, fresh_metrics, **{"rate_limit_per_second": 1000, "rate_limit_burst": 1000, **fields})

    return run


@pytest.fixture
def server(start: Callable[..., HttpServer]) -> HttpServer:
    return start(max_new_tokens=32)


def make_client(server: HttpServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(server: HttpServer) -> Iterator[openai.OpenAI]:
    with make_client(server) as made:
        yield made


@pytest.fixture
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def ask(client: openai.OpenAI, model_id: str, **options: Any) -> Any:
    """The chat completion of QUESTION at temperature 0 with logprobs, as a raw response (headers and body)."""
    arguments: dict[str, Any] = {"max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2} | options
    return client.chat.completions.with_raw_response.create(model=model_id, messages=QUESTION, **arguments)  # type: ignore[arg-type]


def test_models_names_the_served_model_and_version(
    client: openai.OpenAI, weights: WeightState, tiny_model_dir: Path
) -> None:
    raw = client.models.with_raw_response.list()
    (card,) = raw.parse().data
    assert card.id == tiny_model_dir.name  # the local model directory's name
    assert card.model_extra is not None
    assert card.model_extra["model_version"] == 0
    assert card.model_extra["weights_sha256"] == weights.weights_sha256()
    assert raw.headers["X-KED-Model-Version"] == "0"
    assert raw.headers["X-KED-Weights-SHA256"] == weights.weights_sha256()


def test_chat_uses_the_chat_template_and_says_which_version_answered(
    client: openai.OpenAI, model_id: str, loaded: LoadedModel, weights: WeightState
) -> None:
    raw = ask(client, model_id)
    answer = raw.parse()
    assert raw.headers["X-KED-Model-Version"] == "0"
    assert answer.system_fingerprint == f"ked-v0-{weights.weights_sha256()[:12]}"
    assert answer.model == model_id
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = chat_prompt(loaded.tokenizer, [(m["role"], m["content"]) for m in QUESTION])
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert choice.message.content == greedy_text(loaded, prompt_ids, answer.usage.completion_tokens)
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    for token in tokens:
        assert len(token.top_logprobs) == 2
        assert token.logprob <= token.top_logprobs[0].logprob + 1e-6  # greedy: the chosen one is the most likely
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)


def greedy_text(loaded: LoadedModel, prompt_ids: Sequence[int], new_tokens: int) -> str:
    """transformers' own greedy decoding of the same prompt, for comparison."""
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = loaded.model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return str(loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_temperature_zero_is_deterministic_and_a_seed_makes_sampling_reproducible(client: openai.OpenAI, model_id: str) -> None:
    first, again = ask(client, model_id).parse(), ask(client, model_id).parse()
    assert first.choices[0].model_dump() == again.choices[0].model_dump()
    sampled = [ask(client, model_id, temperature=1.5, top_p=0.9, seed=11, max_tokens=16).parse() for _ in range(2)]
    assert sampled[0].choices[0].model_dump() == sampled[1].choices[0].model_dump()
    seeds = {ask(client, model_id, temperature=1.5, seed=seed, max_tokens=16).parse().choices[0].message.content for seed in range(4)}
    assert len(seeds) > 1  # sampling does sample


def test_completion_is_the_same_greedy_decoding_as_query(client: openai.OpenAI, model_id: str, server: HttpServer) -> None:
    prompt = "The capital of France is"
    completion = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    (choice,) = completion.choices
    query = httpx.post(f"{server.url}/v1/query", json={"prompt": prompt, "max_new_tokens": 6}).json()
    assert choice.text == query["completion"]
    assert completion.usage is not None and completion.usage.completion_tokens == query["generated_tokens"]
    assert choice.logprobs is not None
    assert choice.logprobs.tokens is not None and "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(len(choice.logprobs.tokens))]
    assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs or [])  # a dict: tokens that read alike merge


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI, model_id: str, weights: WeightState) -> None:
    whole = ask(client, model_id, max_tokens=24).parse()
    stream = client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
        model=model_id, messages=QUESTION, max_tokens=24, temperature=0, logprobs=True, stream=True,
        stream_options={"include_usage": True},
    )
    assert stream.headers["X-KED-Model-Version"] == "0"
    assert stream.headers["content-type"].startswith("text/event-stream")
    chunks = list(stream.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.system_fingerprint for chunk in chunks} == {f"ked-v0-{weights.weights_sha256()[:12]}"}
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    streamed_tokens = [t.token for chunk in chunks if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert streamed_tokens == [t.token for t in whole.choices[0].logprobs.content]
    finishing = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The capital of France is"
    full = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    stop = full[5:7]
    assert len(full) > 8 and stop.strip()
    cut = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "\x00never"])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == cut.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"max_tokens": 33}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_requests_raise_bad_request_error_with_our_message(
    client: openai.OpenAI, model_id: str, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id, messages=QUESTION, **options)  # type: ignore[arg-type]
    assert raised.value.param == param
    assert raised.value.type == "invalid_request_error"
    assert isinstance(raised.value.body, dict) and raised.value.body["message"].startswith(f"{param}: ")


def test_errors_are_openai_shaped_with_the_right_status(client: openai.OpenAI, server: HttpServer, view: DaemonView) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)  # type: ignore[arg-type]
    assert unknown.value.code == "model_not_found" and "see GET /v1/models" in str(unknown.value)
    url = f"{server.url}/v1/chat/completions"
    answers = {
        "no content type": httpx.post(url, content=b"{}"),
        "not JSON": httpx.post(url, content=b"{", headers={"content-type": "application/json"}),
        "not a request": httpx.post(url, json={"model": "x"}),
        "wrong method": httpx.get(url),
        "too large": httpx.post(url, content=b"x" * (4 * 1024 * 1024 + 1), headers={"content-type": "application/json"}),
    }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"no content type": 415, "not JSON": 400, "not a request": 400, "wrong method": 405, "too large": 413}
    for answer in answers.values():
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert answers["not a request"].json()["error"]["param"] == "messages"
    # The daemon's own routes keep their shape.
    assert set(httpx.post(f"{server.url}/v1/query", content=b"{}").json()) == {"detail"}
    view.model = None  # loading
    with pytest.raises(openai.InternalServerError) as loading:
        client.models.list()
    assert loading.value.status_code == 503 and "still loading" in str(loading.value.body)


def test_the_rate_limit_answers_429_openai_shaped(start: Callable[..., HttpServer]) -> None:
    server = start(rate_limit_per_second=0.01, rate_limit_burst=1)
    with make_client(server) as client:
        client.models.list()
        with pytest.raises(openai.RateLimitError) as limited:
            client.models.list()
    assert limited.value.code == "rate_limit_exceeded"


def test_a_read_token_guards_the_model_and_nothing_else(start: Callable[..., HttpServer]) -> None:
    server = start(read_token=READ_TOKEN, token=WRITE_TOKEN)
    with make_client(server, key="wrong") as stranger, pytest.raises(openai.AuthenticationError) as refused:
        stranger.models.list()
    assert refused.value.code == "invalid_api_key"
    for key in (READ_TOKEN, WRITE_TOKEN):
        with make_client(server, key=key) as reader:
            model_id = reader.models.list().data[0].id
            assert reader.completions.create(model=model_id, prompt="x", max_tokens=2).choices
    query = {"prompt": "The capital of France is", "max_new_tokens": 1}
    assert httpx.post(f"{server.url}/v1/query", json=query).status_code == 401
    assert set(httpx.post(f"{server.url}/v1/query", json=query).json()) == {"detail"}
    bearer = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert httpx.post(f"{server.url}/v1/query", json=query, headers=bearer).status_code == 200
    assert httpx.get(f"{server.url}/v1/status").status_code == 200


def test_an_edit_changes_the_answer_and_a_revert_brings_it_back_bit_for_bit(
    client: openai.OpenAI, model_id: str, loaded: LoadedModel, weights: WeightState
) -> None:
    """A large hand-made rank-one ΔW on the last MLP's down projection makes the answer start with " Rome".

    The tiny model knows no facts, so the "edit" is built to be decisive rather than learnt: the ΔW
    adds, at the last prompt position, a large multiple of the output embedding of " Rome"'s first
    token (u vᵀ with u the MLP activation there, v that embedding). It is published as version 1 the
    way the daemon publishes a commit; the revert publishes version 0 rebuilt from the base weights,
    as the daemon's exact revert does. At temperature 0 the answer after the revert equals the one
    before the edit in every character and every log-probability.
    """
    before = ask(client, model_id).parse()
    target = loaded.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    staged = weights.stage_commit(1, {EDIT_MODULES[-1]: rank_one_edit(loaded, target)})
    weights.publish(staged)
    edited = ask(client, model_id)
    assert edited.headers["X-KED-Model-Version"] == "1"
    assert edited.headers["X-KED-Weights-SHA256"] == staged.weights_sha256
    answer = edited.parse()
    assert answer.system_fingerprint == f"ked-v1-{staged.weights_sha256[:12]}"
    assert answer.choices[0].logprobs.content[0].token == loaded.tokenizer.decode([target])
    assert answer.choices[0].message.content != before.choices[0].message.content

    weights.publish(weights.stage(0, []))
    after = ask(client, model_id).parse()
    assert after.system_fingerprint == before.system_fingerprint
    assert after.choices[0].model_dump() == before.choices[0].model_dump()


def rank_one_edit(loaded: LoadedModel, target: int) -> torch.Tensor:
    """ΔW (in, out) for the last edited down projection that pushes QUESTION's next token towards `target`."""
    module = loaded.model.get_submodule(EDIT_MODULES[-1])
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0, -1].detach().clone()))
    ids = chat_prompt(loaded.tokenizer, [(m["role"], m["content"]) for m in QUESTION])
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    activation = seen[0]
    direction = loaded.model.get_output_embeddings().weight[target].detach()  # type: ignore[operator]
    return 100.0 * torch.outer(activation / activation.dot(activation), direction / direction.norm())


class GatedView(DaemonView):
    """A DaemonView whose streamed generations wait after their first piece of text until `gate` opens.

    `sinks` are the streams' sinks as the generation sees them; `results` what each generation returned.
    """

    def open(self) -> GatedView:
        self.gate, self.reached = threading.Event(), threading.Event()
        self.sinks: list[_Gated] = []
        self.results: list[ServedGeneration] = []
        return self

    def generate(self, request: GenerationRequest, sink: GenerationSink | None = None) -> ServedGeneration:
        if sink is not None:
            sink = _Gated(sink, self.gate, self.reached)
            self.sinks.append(sink)
        result = super().generate(request, sink)
        self.results.append(result)
        return result


@pytest.fixture
def gated(view: DaemonView, loaded: LoadedModel, weights: WeightState) -> GatedView:
    return GatedView(view.ledger, view.sessions, model=loaded, weights=weights).open()


@pytest.fixture
def gated_client(gated: GatedView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]) -> Iterator[openai.OpenAI]:
    with make_client(serve_api(gated, fresh_metrics)) as made:
        yield made


def stream_to_the_gate(client: openai.OpenAI, gated: GatedView, max_tokens: int) -> tuple[str, Any]:
    """(model id, a completion stream of "The capital" whose generation has reached the gate)."""
    model_id = client.models.list().data[0].id
    stream = client.completions.create(model=model_id, prompt="The capital", max_tokens=max_tokens, temperature=0, stream=True)
    assert gated.reached.wait(30)
    return model_id, stream


class _Gated:
    def __init__(self, sink: GenerationSink, gate: threading.Event, reached: threading.Event) -> None:
        self.sink, self.gate, self.reached = sink, gate, reached

    def pinned(self, served: ServedVersion) -> None:
        self.sink.pinned(served)

    def text(self, delta: str, logprobs: Sequence[TokenLogprob]) -> None:
        self.sink.text(delta, logprobs)
        self.reached.set()
        assert self.gate.wait(30)

    def cancelled(self) -> bool:
        return self.sink.cancelled()


def test_a_commit_waits_for_a_stream_in_progress(
    gated_client: openai.OpenAI, gated: GatedView, loaded: LoadedModel, weights: WeightState
) -> None:
    """One whole version per answer: a version published during a stream waits for the stream to end."""
    model_id, stream = stream_to_the_gate(gated_client, gated, 12)
    target = loaded.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    staged = weights.stage_commit(1, {EDIT_MODULES[-1]: rank_one_edit(loaded, target)})
    publisher = threading.Thread(target=weights.publish, args=(staged,))
    publisher.start()
    time.sleep(0.3)
    assert publisher.is_alive() and weights.version == 0  # blocked behind the stream's read lock
    gated.gate.set()
    pieces = list(stream)
    publisher.join(10)
    assert not publisher.is_alive() and weights.version == 1
    assert {piece.system_fingerprint for piece in pieces} == {pieces[0].system_fingerprint}
    assert pieces[0].system_fingerprint.startswith("ked-v0-")
    edited = gated_client.completions.create(model=model_id, prompt="The capital", max_tokens=12, temperature=0)
    assert edited.system_fingerprint == f"ked-v1-{staged.weights_sha256[:12]}"


def test_a_client_that_goes_away_stops_its_generation(gated_client: openai.OpenAI, gated: GatedView) -> None:
    _, stream = stream_to_the_gate(gated_client, gated, 32)
    stream.close()
    deadline = time.monotonic() + 10
    while not gated.sinks[0].cancelled() and time.monotonic() < deadline:
        time.sleep(0.02)
    gated.gate.set()
    while not gated.results and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gated.results[0].generation.completion_tokens < 32


@pytest.mark.real_model
def test_the_default_model_answers_a_chat_as_transformers_generate_does(
    default_model: Any, make_ledger: Callable[[], Any], fresh_metrics: Metrics
) -> None:
    """SmolLM2-135M-Instruct through its own chat template, at temperature 0: the text of plain greedy `generate`."""
    sessions = make_ledger()
    state = WeightState(default_model.model, ["model.layers.20.mlp.up_proj"])
    view = DaemonView(LedgerView(sessions, IngestConfig.model_validate({}), fresh_metrics), sessions, model=default_model, weights=state)
    config = ApiConfig.model_validate({"port": 0, "max_new_tokens": 32})
    from daemon.api import create_app

    with HttpServer(create_app(config, view, fresh_metrics), config) as server, make_client(server) as client:
        (card,) = client.models.list().data
        assert card.id == "SmolLM2-135M-Instruct.Q4_1"
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model=card.id, messages=messages, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    content = answer.choices[0].message.content
    assert content is not None and "Paris" in content
    prompt_ids = chat_prompt(default_model.tokenizer, [("user", messages[0]["content"])])
    assert answer.usage is not None
    assert content == greedy_text(default_model, prompt_ids, answer.usage.completion_tokens)


def test_sse_events_are_data_lines_ending_with_done(server: HttpServer, model_id: str) -> None:
    """The wire format itself, as a client without the SDK reads it."""
    body = {"model": model_id, "prompt": "The capital", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        raw = "".join(response.iter_text())
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: ") :])["object"] == "text_completion"
