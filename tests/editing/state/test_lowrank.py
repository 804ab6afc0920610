"""The low-rank delta codec: decoding is exact arithmetic (same bits however computed), encoding is faithful."""

from __future__ import annotations

import pytest
import torch

from editing.state.lowrank import decode_delta, encode_delta, encode_deltas, encoded_bytes


def _edit_like(d_in: int, d_out: int, rows: int, seed: int = 0) -> torch.Tensor:
    """Like an EMSEdit ΔW: a sum of two ridge-style steps Kᵀ C with `rows` captured rows each."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(d_in, d_out)
    for _ in range(2):
        keys = torch.randn(rows, d_in, generator=gen)
        coeffs = 1e-3 * torch.randn(rows, d_out, generator=gen)
        total = total + keys.T @ coeffs
    return total


def _integer_reference(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoding formula evaluated with int64 integer arithmetic, independent of float matmul kernels."""
    exact = parts["a"].long() @ parts["b"].long().T
    scale = torch.ldexp(torch.ones(()), parts["ea"].double()[:, None] + parts["eb"].double()[None, :])
    return (exact.double() * scale.double()).float()


def test_decoding_equals_exact_integer_arithmetic() -> None:
    parts = encode_delta(_edit_like(96, 256, rows=12))
    assert parts["a"].dtype == torch.int16 and parts["a"].shape[1] <= 24
    assert torch.equal(decode_delta(parts), _integer_reference(parts))


def test_decoding_gives_the_same_bits_with_any_thread_count() -> None:
    parts = encode_delta(_edit_like(300, 700, rows=40, seed=3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = decode_delta(parts)
        torch.set_num_threads(max(2, before))
        multi = decode_delta(parts)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, multi)


def test_encoding_is_faithful_and_much_smaller_than_dense() -> None:
    delta = _edit_like(576, 1536, rows=48)  # SmolLM2 MLP shape, 16 facts x 3 answer tokens per step
    parts = encode_delta(delta)
    decoded = decode_delta(parts)
    assert parts["a"].shape[1] == 96  # the exact rank (2 steps x 48 rows), found without being told
    assert float((decoded - delta).norm() / delta.norm()) < 2e-4
    assert encoded_bytes(parts) * 8 < delta.numel() * 4


def test_a_zero_delta_has_rank_zero_and_decodes_to_zeros() -> None:
    parts = encode_delta(torch.zeros(32, 48))
    assert parts["a"].shape == (32, 0)
    assert torch.equal(decode_delta(parts), torch.zeros(32, 48))


def test_a_delta_too_small_to_factor_is_stored_dense_and_bit_exact() -> None:
    delta = torch.randn(4, 4)
    parts = encode_delta(delta)
    assert set(parts) == {"dense"}
    assert torch.equal(decode_delta(parts), delta)


def test_a_full_rank_delta_is_still_reproduced_closely() -> None:
    delta = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    decoded = decode_delta(encode_delta(delta))
    assert float((decoded - delta).norm() / delta.norm()) < 2e-4


@pytest.mark.parametrize("bad", [torch.full((3, 3), float("nan")), torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3)])
def test_unusable_deltas_are_refused(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        encode_delta(bad)


def test_encode_deltas_returns_canonical_deltas_and_stats() -> None:
    deltas = {"m.a": _edit_like(64, 96, rows=4), "m.b": torch.randn(2, 2)}
    encoded, canonical, stats = encode_deltas(deltas)
    assert all(torch.equal(canonical[n], decode_delta(encoded[n])) for n in deltas)
    assert stats["m.a"].rank == 8 and stats["m.b"].rank == -1
    assert stats["m.a"].stored_bytes == encoded_bytes(encoded["m.a"]) < stats["m.a"].dense_bytes
    assert 0 < stats["m.a"].relative_error < 2e-4 and stats["m.b"].relative_error == 0.0
