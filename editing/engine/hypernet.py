"""The hypernetwork that turns captured (key, output-gradient) pairs into pseudo-pairs.

Only `nn.Module`s live here: plain int arguments, no I/O, no configuration objects.

- `RunningMeanStd`: per-dimension running mean/std of the joint vector z = [u; δ], merged chunk by
  chunk with the exact parallel (Chan) formula (spec §2.1, the EMSEdit form).
- `HyperNetBlock`: one residual low-rank block, `y + scale[j] ⊙ clamp_min(y A B + b, 0) + shift[j]`.
  clamp_min, not ReLU: at initialisation (B = 0, b = 0) the pre-activation is exactly 0 and clamp
  passes gradient 1 there while ReLU passes 0, which would freeze the network at the identity (§2.2).
- `HyperNet`: normaliser, blocks, and the per-module learned step size `lr` and ridge term `lamda`
  (λ = exp(lamda)). One network serves all edited modules of one weight shape; the module index j
  selects the per-module rows of scale, shift, lr and lamda (§2.3).
"""

from __future__ import annotations

import torch
from torch import nn


class RunningMeanStd(nn.Module):
    """Running per-dimension mean and (unbiased) std of rows of width `size`.

    Buffers: `count` (rows seen, float64), `mean`, `var` (population variance of all rows seen) and
    `std` (sqrt of the unbiased variance; 1 before any data, so that normalising is then a shift).
    """

    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    std: torch.Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Merge a chunk of rows (m, size) into the statistics; an empty chunk changes nothing."""
        m = rows.shape[0]
        if m == 0:
            return
        rows = rows.to(self.mean.dtype)
        batch_mean = rows.mean(0)
        batch_var = rows.var(0, unbiased=False)
        n = float(self.count)
        total = n + m
        delta = batch_mean - self.mean
        m2 = self.var * n + batch_var * m + delta.square() * (n * m / total)
        self.mean.add_(delta * (m / total))
        self.var.copy_(m2 / total)
        self.std.copy_(torch.sqrt(m2 / (total - 1 + 1e-8)))
        self.count.fill_(total)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Normalise rows with the current statistics (no update)."""
        return (rows - self.mean) / (self.std + torch.finfo(torch.float32).eps)


class HyperNetBlock(nn.Module):
    """A residual low-rank block on rows of width `size`; the identity at initialisation."""

    def __init__(self, size: int, rank: int, n_modules: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(size, rank))  # A: plain randn, no fan-in scaling (§2.2)
        self.up = nn.Parameter(torch.zeros(rank, size))  # B = 0 makes the block the identity
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Embedding(n_modules, size)
        self.shift = nn.Embedding(n_modules, size)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, rows: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        """rows: (N, size); module_idx: (N,) long. Returns (N, size)."""
        hidden = (rows @ self.down @ self.up + self.bias).clamp_min(0)
        out: torch.Tensor = rows + self.scale(module_idx) * hidden + self.shift(module_idx)
        return out


class HyperNet(nn.Module):
    """Maps captured (u, δ) of modules with weight shape (key_size, value_size) to pseudo-pairs.

    The outputs stay in normalised units (there is no de-normalisation, §2.2).
    """

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_modules: int, lr: float) -> None:
        super().__init__()
        self.key_size = key_size
        self.value_size = value_size
        size = key_size + value_size
        self.normaliser = RunningMeanStd(size)
        self.blocks = nn.ModuleList(HyperNetBlock(size, rank, n_modules) for _ in range(n_blocks))
        self.lr = nn.Embedding(n_modules, 1)
        self.lamda = nn.Embedding(n_modules, 1)
        nn.init.constant_(self.lr.weight, lr)
        nn.init.zeros_(self.lamda.weight)

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, module_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys: (N, key_size), grads: (N, value_size) -> pseudo-keys (N, key_size), pseudo-grads (N, value_size)."""
        rows = self.normaliser(torch.cat([keys, grads], dim=-1))  # (N, key_size + value_size)
        idx = torch.full((rows.shape[0],), module_idx, dtype=torch.long, device=rows.device)
        for block in self.blocks:
            rows = block(rows, idx)
        return rows[:, : self.key_size], rows[:, self.key_size :]

    def step_size(self, module_idx: int) -> torch.Tensor:
        """η_j, a 0-d tensor."""
        eta: torch.Tensor = self.lr.weight[module_idx, 0]
        return eta

    def ridge(self, module_idx: int) -> torch.Tensor:
        """λ_j = exp(lamda_j), a 0-d tensor."""
        lam: torch.Tensor = self.lamda.weight[module_idx, 0].exp()
        return lam

    def values(self, keys: torch.Tensor, grads: torch.Tensor, module_idx: int) -> torch.Tensor:
        """The desired output changes v_i = −η_j ⟨u_i, ũ_i⟩ δ̃_i (§4.1), shape (N, value_size)."""
        pseudo_keys, pseudo_grads = self(keys, grads, module_idx)
        coef = -self.step_size(module_idx) * (keys * pseudo_keys).sum(-1)  # (N,)
        values: torch.Tensor = coef[:, None] * pseudo_grads
        return values


def shape_key(shape: tuple[int, int]) -> str:
    """The name of the hypernetwork that serves weights of this (in, out) shape."""
    return f"{shape[0]}x{shape[1]}"


class EditorNets(nn.Module):
    """All hypernetworks of one editor: per step s (1-based), one `HyperNet` per distinct weight shape.

    With `shared=True` (batch mode) a single set serves every step at full rank; otherwise step s
    has its own networks (own normalisers, step sizes and ridge terms) of rank `rank // s`.
    `module_shapes` maps each edited module name to its (in, out) weight shape; its order fixes the
    module index j within each shape group.
    """

    def __init__(
        self, module_shapes: dict[str, tuple[int, int]], steps: int, rank: int, n_blocks: int, lr: float, shared: bool
    ) -> None:
        super().__init__()
        self.steps = steps
        self.shared = shared
        self.index: dict[str, tuple[str, int]] = {}
        groups: dict[str, list[str]] = {}
        for name, shape in module_shapes.items():
            members = groups.setdefault(shape_key(shape), [])
            self.index[name] = (shape_key(shape), len(members))
            members.append(name)
        shapes = {shape_key(shape): shape for shape in module_shapes.values()}
        self.per_step = nn.ModuleList(
            nn.ModuleDict(
                {
                    key: HyperNet(din, dout, max(1, rank // (s + 1)), n_blocks, len(groups[key]), lr)
                    for key, (din, dout) in shapes.items()
                }
            )
            for s in range(1 if shared else steps)
        )

    def net(self, step: int, module_name: str) -> tuple[HyperNet, int]:
        """The network of 1-based `step` serving `module_name`, and the module's index j in it."""
        key, idx = self.index[module_name]
        nets = self.per_step[0 if self.shared else step - 1]
        net = nets[key]  # type: ignore[index]
        assert isinstance(net, HyperNet)
        return net, idx

    def normaliser_state(self) -> dict[str, torch.Tensor]:
        """Copies of every running-normaliser buffer, keyed like the state dict."""
        return {name: buf.detach().clone() for name, buf in self.named_buffers() if ".normaliser." in name}

    def load_normaliser_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the normaliser buffers from `normaliser_state()` output (exact copies); KeyError on a foreign key."""
        buffers = dict(self.named_buffers())
        missing = [name for name in buffers if ".normaliser." in name and name not in state]
        unknown = [name for name in state if name not in buffers]
        if missing or unknown:
            raise KeyError(f"normaliser state does not fit these networks: missing {missing[:3]}, unknown {unknown[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                buffers[name].copy_(tensor)
