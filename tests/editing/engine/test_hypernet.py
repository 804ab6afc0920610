"""The hypernetwork: identity at initialisation, clamp (not ReLU) gradients, exact running statistics."""

from __future__ import annotations

import pytest
import torch

from editing.engine.hypernet import EditorNets, HyperNet, HyperNetBlock, RunningMeanStd


def test_identity_at_initialisation_outputs_the_normalised_inputs() -> None:
    torch.manual_seed(0)
    net = HyperNet(key_size=6, value_size=4, rank=3, n_blocks=4, n_modules=2, lr=1e-3)
    keys, grads = torch.randn(20, 6), torch.randn(20, 4)
    net.normaliser.update(torch.cat([keys, grads], -1))
    pseudo_keys, pseudo_grads = net(keys, grads, 1)
    expected = net.normaliser(torch.cat([keys, grads], -1))
    torch.testing.assert_close(pseudo_keys, expected[:, :6], rtol=0, atol=0)
    torch.testing.assert_close(pseudo_grads, expected[:, 6:], rtol=0, atol=0)


def test_gradient_passes_the_clamp_at_zero_so_the_block_can_leave_the_identity() -> None:
    torch.manual_seed(0)
    block = HyperNetBlock(size=5, rank=2, n_modules=1)
    rows = torch.randn(7, 5)
    block(rows, torch.zeros(7, dtype=torch.long)).square().sum().backward()
    assert block.up.grad is not None and block.up.grad.abs().sum() > 0, "B must get gradient at B = 0"
    assert block.bias.grad is not None and block.bias.grad.abs().sum() > 0
    assert block.shift.weight.grad is not None and block.shift.weight.grad.abs().sum() > 0
    # A only acts through B = 0 and scale multiplies a zero activation: no gradient yet (spec §2.2)
    assert block.down.grad is not None and block.down.grad.abs().sum() == 0
    assert block.scale.weight.grad is not None and block.scale.weight.grad.abs().sum() == 0


def test_relu_would_have_frozen_the_block() -> None:
    zero = torch.zeros(3, requires_grad=True)
    (grad_clamp,) = torch.autograd.grad(zero.clamp_min(0).sum(), zero)
    (grad_relu,) = torch.autograd.grad(torch.relu(zero).sum(), zero)
    assert torch.equal(grad_clamp, torch.ones(3)) and torch.equal(grad_relu, torch.zeros(3))


def test_running_statistics_match_the_exact_ones_of_all_chunks() -> None:
    torch.manual_seed(0)
    norm = RunningMeanStd(8)
    chunks = [torch.randn(n, 8, dtype=torch.float64) * 3 + 1 for n in (5, 1, 17, 0, 2)]
    for chunk in chunks:
        norm.update(chunk)
    every = torch.cat(chunks)
    assert int(norm.count) == every.shape[0]
    torch.testing.assert_close(norm.mean, every.mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.std, every.std(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.var, every.var(0, unbiased=False).float(), rtol=1e-5, atol=1e-5)


def test_a_single_row_gives_finite_statistics_and_an_empty_chunk_is_skipped() -> None:
    norm = RunningMeanStd(3)
    norm.update(torch.empty(0, 3))
    assert int(norm.count) == 0 and torch.equal(norm.std, torch.ones(3))
    norm.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.isfinite(norm.std).all() and torch.equal(norm.mean, torch.tensor([1.0, 2.0, 3.0]))


def test_values_point_against_the_gradient_at_initialisation() -> None:
    torch.manual_seed(0)
    net = HyperNet(key_size=6, value_size=4, rank=3, n_blocks=2, n_modules=1, lr=1e-2)
    keys, grads = torch.randn(50, 6) + 2.0, torch.randn(50, 4)
    values = net.values(keys, grads, 0)
    # without statistics the normaliser only shifts by 0: v = -η ⟨u,u⟩ δ
    torch.testing.assert_close(values, -1e-2 * keys.square().sum(-1, keepdim=True) * grads, rtol=1e-5, atol=1e-6)


def test_networks_are_shared_per_shape_and_ranks_decay_per_step() -> None:
    shapes = {"a": (6, 4), "b": (6, 4), "c": (4, 6)}
    nets = EditorNets(shapes, steps=3, rank=8, n_blocks=1, lr=1e-3, shared=False)
    first_a, idx_a = nets.net(1, "a")
    first_b, idx_b = nets.net(1, "b")
    assert first_a is first_b and (idx_a, idx_b) == (0, 1)
    assert nets.net(1, "c")[0] is not first_a
    assert [nets.net(s, "a")[0].blocks[0].down.shape[1] for s in (1, 2, 3)] == [8, 4, 2]  # r // s
    shared = EditorNets(shapes, steps=2, rank=8, n_blocks=1, lr=1e-3, shared=True)
    assert shared.net(1, "a")[0] is shared.net(2, "a")[0]
    assert shared.net(2, "a")[0].blocks[0].down.shape[1] == 8


def test_normaliser_state_round_trips_exactly_and_rejects_foreign_state() -> None:
    nets = EditorNets({"a": (3, 2)}, steps=2, rank=2, n_blocks=1, lr=1e-3, shared=False)
    before = nets.normaliser_state()
    nets.net(1, "a")[0].normaliser.update(torch.randn(4, 5))
    changed = nets.normaliser_state()
    assert not torch.equal(changed["per_step.0.3x2.normaliser.mean"], before["per_step.0.3x2.normaliser.mean"])
    nets.load_normaliser_state(before)
    assert all(torch.equal(nets.normaliser_state()[k], v) for k, v in before.items())
    with pytest.raises(KeyError):
        nets.load_normaliser_state({"nonsense": torch.zeros(1)})
