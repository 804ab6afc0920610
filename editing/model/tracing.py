"""Capturing keys u and output gradients δ of the edited modules (spec §1.2).

`trace_modules(modules, select=...)` is the only place that registers hooks. Inside the `with`
block, each forward pass records every module's input and registers a hook on its output tensor;
the following backward pass records the output gradient. On exit every module hook is removed
(tensor hooks die with the tensors of that pass). Nothing is stored on modules or parameters.

What is kept, per module (all float32):
- `keys[name]`, `grads[name]`: u and δ at the selected positions (`select`, a (B, T) bool mask,
  normally the answer-predicting positions `labels != -100`), one (N, d) tensor per pass.
- `weight_grads[name]` (with `weight_grads=True`): ∂L/∂W in the (in, out) convention, accumulated
  over passes as Σ_t u_t δ_tᵀ over every position. This is the LM gradient for the edited weights
  without turning on `requires_grad` for them.

Module outputs only get `requires_grad` where they lack it (the lowest edited modules); an output that
already requires grad is left in the graph, so gradients into earlier modules stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Trace:
    """What one `trace_modules` block recorded. Set `select` before each forward pass."""

    select: torch.Tensor | None = None
    keep_weight_grads: bool = False
    keys: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    weight_grads: dict[str, torch.Tensor] = field(default_factory=dict)

    def stacked(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All selected (keys, grads) rows of one module, concatenated over passes: (N, d_in), (N, d_out)."""
        keys, grads = self.keys.get(name, []), self.grads.get(name, [])
        if len(keys) != len(grads):
            raise RuntimeError(f"module {name}: {len(keys)} forward passes but {len(grads)} backward passes traced")
        return torch.cat(keys), torch.cat(grads)


def _rows(tensor: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (N, d) float32 rows at the selected positions (all positions without a mask)."""
    if select is None:
        return tensor.detach().reshape(-1, tensor.shape[-1]).float()
    return tensor.detach()[select.to(tensor.device)].float()  # modules may sit on several devices (device_map)


def _make_hook(name: str, trace: Trace) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        key = inputs[0]
        select = trace.select
        trace.keys.setdefault(name, []).append(_rows(key, select))
        if not torch.is_grad_enabled():
            return output
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)

        def on_grad(grad: torch.Tensor) -> None:
            trace.grads.setdefault(name, []).append(_rows(grad, select))
            if trace.keep_weight_grads:
                flat_key = key.detach().reshape(-1, key.shape[-1]).float()  # (B*T, d_in)
                flat_grad = grad.detach().reshape(-1, grad.shape[-1]).float()  # (B*T, d_out)
                update = flat_key.T @ flat_grad
                if name in trace.weight_grads:
                    trace.weight_grads[name].add_(update)
                else:
                    trace.weight_grads[name] = update

        output.register_hook(on_grad)  # type: ignore[no-untyped-call]
        return output

    return hook


@contextmanager
def trace_modules(modules: Mapping[str, nn.Module], *, weight_grads: bool = False) -> Iterator[Trace]:
    """Record inputs and output gradients of `modules` during the passes run inside the block.

    Invariant: on exit no hook registered here remains on any module, even after an exception.
    """
    trace = Trace(keep_weight_grads=weight_grads)
    handles = [module.register_forward_hook(_make_hook(name, trace)) for name, module in modules.items()]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
