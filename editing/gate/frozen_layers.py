"""The decoder layers below the lowest edited module: their outputs never change, so they are computed once.

An edit changes only the edited modules (by default the up-projections of layers 20-25 of SmolLM2's 30),
and the reference swap of `FrozenBase` only those too. Every layer below the lowest edited one computes
the same function for the whole life of the service, so the hidden states entering that layer depend
on the token ids alone. The gate scores the same rows again and again (the standing prompts every
batch; the locality prompts on the base model, then on every try; the efficacy rows on every try of a
bisection), so `FrozenLayers` keeps, per row of token ids, the hidden states entering the first edited
layer, and a scoring pass runs only the layers from there on. For SmolLM2 that is 10 layers of 30.

How the upper part is run without knowing each architecture's forward: the model's own forward is
called on the token ids as usual, with the layers below the first edited one swapped for pass-through
modules (their input comes out unchanged) and a pre-hook on the first edited layer that replaces its
input by the cached hidden states. Everything else (embeddings, masks, rotary or absolute positions,
per-layer attention types, the final norm and head) is the model's own code, with the layer indices
unchanged. A model whose decoder layers are not called as ``layer(hidden_states, ...) -> tensor`` does
not fit; `FrozenLayers.verify` compares the two paths on a few rows before use, and a caller falls
back to the full forward when they differ.

Rows are keyed by their token ids; the hidden states of a row do not depend on the rows it was
batched with (padding is masked and positions come from the attention mask), so a row computed in one
batch is reused in any other. The cache holds at most `max_tokens` tokens (least recently used go).

Packing: the gate's rows are short and of uneven length (SmolLM2 locality prompts 13-28 tokens), so a
left-padded batch of 16 spends a third or more of its matrix products on padding. By default a pass
concatenates its rows into one sequence instead, with positions restarting at 0 for each row and no
attention mask, which the model's own mask code (transformers' packed-sequence detection) turns into a
block-diagonal causal mask; the head runs on the scored positions only (`logits_to_keep` as indices).
The arithmetic is that of the real tokens alone. `verify` checks the packed pass against the padded full
forward and falls back to padded batches when they differ (`packed` says which is in use).

Contract for callers: the layers below `first_edited` must not change while the cache lives (nothing
in this project edits them; build a new `FrozenLayers` for another model or another module set), and
the caller holds the model exclusively while a pass runs (the swap is visible to any concurrent user).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from editing.model.scoring import ScoringBatch, left_pad, model_device, tail_logits

Row = tuple[int, ...]


class _PassThrough(nn.Module):
    """Stands in for a frozen layer during an upper-layers pass: returns its hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Reached(Exception):
    """Raised by the capture hook once the input of the first edited layer is known: nothing above runs."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("reached the first edited layer")
        self.hidden = hidden


def _hidden_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]  # type: ignore[no-any-return]


def _layer_stack(model: nn.Module, module_names: Sequence[str]) -> tuple[str, nn.ModuleList, int] | None:
    """(name of the decoder-layer list, the list, lowest layer index holding an edited module), if any."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name}
    best: tuple[str, nn.ModuleList, int] | None = None
    for module_name in module_names:
        found = None
        for list_name, layers in lists.items():
            match = re.match(re.escape(list_name) + r"\.(\d+)(\.|$)", module_name)
            if match and int(match.group(1)) < len(layers):
                found = (list_name, layers, int(match.group(1)))
                break
        if found is None:
            return None  # an edited module outside any layer list: nothing below it is known to be frozen
        if best is not None and best[0] != found[0]:
            return None  # edited modules in two stacks (e.g. encoder and decoder): not handled
        if best is None or found[2] < best[2]:
            best = found
    return best


class FrozenLayers:
    """Hidden states entering the first edited decoder layer, per row of token ids (see module doc)."""

    def __init__(self, stack_name: str, layers: nn.ModuleList, first_edited: int, max_tokens: int) -> None:
        if not 0 < first_edited < len(layers):
            raise ValueError(f"first edited layer {first_edited} leaves no frozen layer below it")
        self.stack_name = stack_name
        self.layers = layers
        self.first_edited = first_edited
        self.max_tokens = max_tokens
        self.hits = 0  #: rows served from the cache
        self.misses = 0  #: rows whose lower layers had to be run
        #: rows of a pass run as one packed sequence (see the module doc); `verify` may turn it off
        self.packed = True
        self._rows: OrderedDict[Row, torch.Tensor] = OrderedDict()
        self._tokens = 0

    @classmethod
    def locate(cls, model: nn.Module, module_names: Sequence[str], max_tokens: int = 16384) -> FrozenLayers | None:
        """The frozen layers of `model` when `module_names` are edited; None when nothing can be cached.

        None when the edited modules are not all inside one list of layers, when the lowest of them is
        in layer 0, or when `max_tokens` is 0.
        """
        if max_tokens <= 0 or not module_names:
            return None
        found = _layer_stack(model, module_names)
        if found is None or found[2] == 0:
            return None
        return cls(found[0], found[1], found[2], max_tokens)

    # --- the cache -------------------------------------------------------------------------------

    @property
    def cached_rows(self) -> int:
        return len(self._rows)

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def clear(self) -> None:
        self._rows.clear()
        self._tokens = 0

    def _put(self, row: Row, hidden: torch.Tensor) -> None:
        if row in self._rows or len(row) > self.max_tokens:
            return
        self._rows[row] = hidden.detach().clone()
        self._tokens += len(row)
        while self._tokens > self.max_tokens:
            old, _ = self._rows.popitem(last=False)
            self._tokens -= len(old)

    def _get(self, row: Row) -> torch.Tensor | None:
        hidden = self._rows.get(row)
        if hidden is not None:
            self._rows.move_to_end(row)
        return hidden

    # --- passes ----------------------------------------------------------------------------------

    def _lower(self, model: nn.Module, rows: Sequence[Row], pad: int) -> None:
        """Run the frozen layers on `rows` (one batch, packed or left-padded) and cache each row's hidden states."""
        device = model_device(model)
        if self.packed:
            ids, positions = _packed(rows)
            inputs = {"input_ids": ids, "attention_mask": None, "position_ids": positions}
        else:
            batch = left_pad([list(r) for r in rows], [[0]] * len(rows), pad)
            inputs = {
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids,
            }

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Reached(_hidden_argument(args, kwargs))

        handle = self.layers[self.first_edited].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**{k: v.to(device) if v is not None else None for k, v in inputs.items()}, use_cache=False)
        except _Reached as reached:
            hidden = reached.hidden
        else:
            raise RuntimeError(f"the forward pass never reached layer {self.first_edited} of {self.stack_name}")
        finally:
            handle.remove()
        if self.packed:
            start = 0
            for row in rows:
                self._put(row, hidden[0, start : start + len(row)])
                start += len(row)
        else:
            width = max(len(r) for r in rows)  # the left-padded batch's width
            for b, row in enumerate(rows):
                self._put(row, hidden[b, width - len(row) :])
        self.misses += len(rows)

    @contextmanager
    def _upper_only(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block a forward pass runs the layers from the first edited one on `hidden`."""
        saved = [self.layers[i] for i in range(self.first_edited)]

        def inject(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.layers[self.first_edited].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            passthrough = _PassThrough()
            for i in range(self.first_edited):
                self.layers[i] = passthrough
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(saved):
                self.layers[i] = layer

    def tail_logits(self, model: nn.Module, batch: ScoringBatch, pad: int) -> torch.Tensor:
        """`editing.model.scoring.tail_logits` of `batch` (no prefix cache), running only the upper layers.

        Rows not cached yet run the frozen layers once first (`pad` is the id used to pad them when not
        packed). A batch larger than the whole cache is scored with every layer instead. With `packed`,
        the batch's rows run as one sequence; the result has the padded batch's (B, K, V) layout either way.
        """
        rows: list[Row] = []
        for b in range(int(batch.input_ids.shape[0])):
            real = batch.attention_mask[b].bool()
            rows.append(tuple(int(t) for t in batch.input_ids[b][real].tolist()))
        parts = [self._get(r) for r in rows]
        missing = list(dict.fromkeys(r for r, p in zip(rows, parts, strict=True) if p is None))
        if missing:
            self._lower(model, missing, pad)
            parts = [p if p is not None else self._get(r) for r, p in zip(rows, parts, strict=True)]
        self.hits += len(rows) - len(missing)
        present = [p for p in parts if p is not None]
        if len(present) < len(parts):
            # the batch does not fit the cache (a row evicted by its own batch, or longer than the whole
            # cache): score it with every layer rather than fail
            return tail_logits(model, batch)
        keep = int(batch.labels.shape[1])
        if self.packed:
            return self._packed_tail(model, rows, present, keep)
        width = int(batch.input_ids.shape[1])
        hidden = present[0].new_zeros((len(rows), width, int(present[0].shape[-1])))
        for b, part in enumerate(present):
            hidden[b, width - part.shape[0] :] = part
        device = model_device(model)
        with self._upper_only(hidden), torch.no_grad():
            out = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
                logits_to_keep=keep,
                use_cache=False,
            )
        logits: torch.Tensor = out.logits[:, -keep:].float()
        return logits

    def _packed_tail(self, model: nn.Module, rows: list[Row], parts: list[torch.Tensor], keep: int) -> torch.Tensor:
        """(B, K, V) logits of the last `keep` positions of each row, the rows run as one packed sequence.

        A row shorter than `keep` has no logits for its first positions: those entries are copies of its
        first position's (the caller's labels are -100 there, as in a left-padded batch).
        """
        ids, positions = _packed(rows)
        lengths = torch.tensor([len(r) for r in rows])
        ends = lengths.cumsum(0)  # one past each row's last position
        starts = ends - lengths
        offsets = torch.arange(keep - 1, -1, -1)  # k-th kept position sits keep-1-k before the row's end
        index = torch.maximum(ends.unsqueeze(1) - 1 - offsets, starts.unsqueeze(1))  # (B, K)
        device = model_device(model)
        hidden = torch.cat(parts).unsqueeze(0)
        with self._upper_only(hidden), torch.no_grad():
            out = model(
                input_ids=ids.to(device),
                attention_mask=None,
                position_ids=positions.to(device),
                logits_to_keep=index.reshape(-1).to(device),
                use_cache=False,
            )
        logits: torch.Tensor = out.logits[0].float()
        return logits.reshape(len(rows), keep, -1)

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Cache the frozen layers' output of every row the model is run on within the block.

        For a caller that runs the model on rows the gate scores later anyway (the editor's forward
        pass over the facts' prompt + answer rows, which are the efficacy rows). Only rows whose
        positions are 0, 1, ... (right padding without position ids, or positions from the mask) are
        recorded; the pass itself is not changed.
        """
        seen: dict[str, Any] = {}

        def inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.clear()
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                seen["ids"] = ids.detach().cpu()
                mask = kwargs.get("attention_mask")
                seen["mask"] = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.ones_like(seen["ids"])
                positions = kwargs.get("position_ids")
                seen["positions"] = positions.detach().cpu() if isinstance(positions, torch.Tensor) else None

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if "ids" not in seen:
                return
            ids, mask, positions = seen.pop("ids"), seen.pop("mask"), seen.pop("positions")
            hidden = _hidden_argument(args, kwargs).detach()
            width = int(ids.shape[1])
            for b in range(int(ids.shape[0])):
                real = mask[b].bool()
                n = int(real.sum())
                row_positions = positions[b if positions.shape[0] > 1 else 0][real] if positions is not None else (
                    torch.arange(width)[real]
                )
                if n == 0 or not torch.equal(row_positions, torch.arange(n)):
                    continue
                row = tuple(int(t) for t in ids[b][real].tolist())
                if self._get(row) is None:
                    self._put(row, hidden[b][real.to(hidden.device)])

        outer = model.register_forward_pre_hook(inputs, with_kwargs=True)
        inner = self.layers[self.first_edited].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            yield
        finally:
            outer.remove()
            inner.remove()

    def verify(self, model: nn.Module, pad: int) -> str | None:
        """None when the upper-layers pass reproduces the full forward on a few rows; otherwise why not.

        The packed pass is tried first; when it differs (or fails), `packed` is turned off and the padded
        pass is tried. The rows are of different lengths (so padding and packing are exercised) and drawn
        from the vocabulary's first ids; the comparison is on log-probabilities with a tolerance for the
        model's dtype.
        """
        vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
        rows = [[(7 * i + 3) % vocab for i in range(n)] for n in (9, 5, 2)]
        batch = left_pad(rows, [[0, 0]] * len(rows), pad)
        dtype = next(model.parameters()).dtype
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        try:
            full = torch.log_softmax(tail_logits(model, batch), dim=-1)
        except Exception as exc:  # the model cannot even score a left-padded batch without a cache
            return f"the full forward failed: {type(exc).__name__}: {exc}"
        problems = []
        for packed in (True, False):
            self.packed = packed
            try:
                upper = torch.log_softmax(self.tail_logits(model, batch, pad), dim=-1)
            except Exception as exc:  # any failure means this model's stack does not fit the scheme
                problems.append(f"the {_mode(packed)} upper-layers pass failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                self.clear()
                self.hits = self.misses = 0
            difference = float((full - upper).abs().max())
            if difference <= tolerance:
                return None
            problems.append(
                f"the {_mode(packed)} upper-layers pass differs from the full forward by {difference:.3g} "
                f"(tolerance {tolerance})"
            )
        return "; ".join(problems)


def _mode(packed: bool) -> str:
    return "packed" if packed else "padded"


def _packed(rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, total) token ids of `rows` one after the other, and positions restarting at 0 for each row."""
    ids = torch.tensor([t for row in rows for t in row], dtype=torch.long).unsqueeze(0)
    positions = torch.cat([torch.arange(len(row)) for row in rows]).unsqueeze(0)
    return ids, positions
