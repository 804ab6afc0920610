"""The live weight state: fp32 masters, bit-exact rebuilds, the weights hash and consistent publishing."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import torch

from editing.errors import ModelMismatch
from editing.model.targets import resolve_modules, weight_in_out
from editing.state.weights import ReadWriteLock, WeightsHashMismatch, WeightState, hash_in_out


def _delta(state: WeightState, seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(base.shape, generator=gen) for name, base in state.base().items()}


def _edited(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: weight_in_out(m).detach().clone() for name, m in resolve_modules(model, names).items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_sequence_of_commits_and_reverts_equals_a_fresh_rebuild(
    model_type: str, dtype: torch.dtype, engine_tiny_lm: Any
) -> None:
    model, names = engine_tiny_lm(model_type, dtype=dtype)
    state = WeightState(model, names)
    deltas = {v: _delta(state, v) for v in range(1, 9)}
    chain: list[int] = []
    rng = random.Random(0)
    next_version = 1
    for _ in range(12):  # commits interleaved with reverts to random earlier versions
        if chain and rng.random() < 0.35:
            chain = chain[: rng.randrange(len(chain))]
            state.publish(state.stage(chain[-1] if chain else 0, [deltas[v] for v in chain]))
        elif next_version in deltas:
            state.publish(state.stage_commit(next_version, deltas[next_version]))
            chain.append(next_version)
            next_version += 1
    live = _edited(model, names)

    fresh_model, _ = engine_tiny_lm(model_type, dtype=dtype)
    fresh = WeightState(fresh_model, names)
    fresh.publish(fresh.stage(state.version, [deltas[v] for v in chain]))

    assert fresh.version == state.version
    assert all(torch.equal(live[n], weight_in_out(m)) for n, m in resolve_modules(fresh_model, names).items())
    assert all(torch.equal(state.masters()[n], fresh.masters()[n]) for n in names)
    assert fresh.weights_sha256() == state.weights_sha256()


def test_live_weights_are_the_masters_rounded_once(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama", dtype=torch.bfloat16)
    state = WeightState(model, names)
    for v in range(1, 40):  # updates far below bf16 resolution: lost without masters
        state.publish(state.stage_commit(v, _delta(state, v, scale=1e-6)))
    for name, live in _edited(model, names).items():
        assert torch.equal(live, state.masters()[name].to(torch.bfloat16))
    assert any(not torch.equal(state.masters()[n], state.base()[n]) for n in names)


def test_staged_hash_is_the_hash_the_model_gets(engine_tiny_lm: Any) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model, names = engine_tiny_lm("gpt2", dtype=dtype)
        state = WeightState(model, names)
        base_hash = state.weights_sha256()
        staged = state.stage_commit(1, _delta(state, 1))
        assert state.weights_sha256() == base_hash  # staging publishes nothing
        state.publish(staged)
        assert state.weights_sha256() == staged.weights_sha256 != base_hash
        assert (staged.masters_sha256 == staged.weights_sha256) == (dtype == torch.float32)
        state.verify(staged.weights_sha256, "test")
        with pytest.raises(WeightsHashMismatch, match="recorded"):
            state.verify(base_hash, "test")


def test_the_hash_covers_names_order_and_every_bit() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    reference = hash_in_out([("x", a), ("y", b)])
    assert hash_in_out([("y", b), ("x", a)]) != reference
    assert hash_in_out([("x", a), ("z", b)]) != reference
    flipped = b.clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of one element
    assert hash_in_out([("x", a), ("y", flipped)]) != reference


def test_deltas_for_other_modules_or_shapes_are_refused(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    with pytest.raises(ModelMismatch, match="not edited here"):
        state.stage_commit(1, {"model.layers.0.mlp.up_proj": torch.zeros(64, 128)})
    with pytest.raises(ModelMismatch, match="another model"):
        state.stage_commit(1, {names[0]: torch.zeros(3, 3)})
    assert state.version == 0


def test_a_reader_never_sees_a_half_published_version(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    staged = [state.stage(v, [_delta(state, v, scale=1.0)]) for v in (1, 2)]
    allowed = {s.weights_sha256 for s in staged} | {state.weights_sha256()}
    seen: list[str] = []
    stop = threading.Event()

    def query() -> None:
        while not stop.is_set():
            with state.reading():
                seen.append(hash_in_out((n, weight_in_out(m)) for n, m in state.modules.items()))

    reader = threading.Thread(target=query)
    reader.start()
    try:
        for i in range(60):
            state.publish(staged[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) <= allowed


def test_the_lock_lets_readers_share_and_writers_exclude() -> None:
    lock = ReadWriteLock()
    order: list[str] = []
    inside = threading.Event()

    def second_reader() -> None:
        with lock.reading():
            inside.set()

    with lock.reading():
        other = threading.Thread(target=second_reader)
        other.start()
        assert inside.wait(5)  # a second reader got in alongside the first
    other.join(timeout=5)
    writer_done = threading.Event()
    with lock.writing():
        with lock.writing(), lock.reading():  # the writer may re-enter and read
            order.append("nested")

        def read() -> None:
            with lock.reading():
                order.append("reader")
            writer_done.set()

        thread = threading.Thread(target=read)
        thread.start()
        assert not writer_done.wait(0.2)
        order.append("writer")
    thread.join(timeout=5)
    assert order == ["nested", "writer", "reader"]
