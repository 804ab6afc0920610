"""`export_adapter`: the committed delta as a PEFT LoRA adapter that the real `peft` library loads on the base model.

Tolerances: the models are float32. PEFT's forward adds `(x Aᵀ) Bᵀ` to `x Wᵀ` instead of computing
`x (W + BA)ᵀ`, so its logits differ from the daemon's by float32 rounding only: a few units of 1e-7
relative per product, summed over the tiny model's 64-wide layers, far below 1e-4. Merged
(`merge_and_unload`), the exact adapter gives the daemon's weights bit for bit wherever float32 can
(`merged_mismatches` counts the rest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from editing.errors import ModelMismatch
from editing.model.loading import LoadedModel, model_fingerprint
from editing.model.targets import weight_in_out
from editing.state.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PROBE_PROMPTS,
    adapter_config,
    exact_delta,
    export_adapter,
    factorise,
    probe_token_ids,
)
from editing.state.export import EXPORT_INFO_NAME, ExportError
from editing.state.history import CommitRef, ModelHistory, prepare_commit
from editing.state.weights import WeightState
from store.artefacts import ArtefactStore

peft = pytest.importorskip("peft")  # a dev dependency (pyproject's dev extra): present wherever the tests run
#: float32 logits, unmerged LoRA forward against merged weights: rounding only (module docstring)
LOGIT_ATOL = 1e-4


def _loaded(model: torch.nn.Module, tokenizer: Any) -> LoadedModel:
    return LoadedModel(model, tokenizer, "tiny", None, model_fingerprint(model))


def _commit(
    state: WeightState, tmp_path: Path, count: int, rank: int = 3, scale: float = 0.005
) -> tuple[ModelHistory, dict[int, CommitRef]]:
    """`count` commits of random rank-`rank` deltas; returns the history and the refs a ledger would hold.

    `scale` 0.005 gives deltas of about a tenth of the tiny model's weights (std 0.02), as edits are small.
    """
    history = ModelHistory(state, ArtefactStore(tmp_path / "artefacts"))
    refs: dict[int, CommitRef] = {}
    history.open(refs)
    for version in range(1, count + 1):
        gen = torch.Generator().manual_seed(version)
        deltas = {
            name: scale * torch.randn(base.shape[0], rank, generator=gen) @ torch.randn(rank, base.shape[1], generator=gen)
            for name, base in state.base().items()
        }
        history.commit(
            prepare_commit(deltas, {}),
            version=version,
            record=lambda r: refs.__setitem__(r.version, CommitRef(r.version, r.parent, r.artefact_sha256, r.weights_sha256)),
        )
    return history, refs


def _logits(model: torch.nn.Module, ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row])).logits for row in ids]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: Conv1D (fan_in_fan_out) and tied embeddings
def test_the_exact_adapter_on_the_base_model_gives_the_daemons_logits(
    model_type: str, engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path
) -> None:
    model, names = engine_tiny_lm(model_type)
    state = WeightState(model, names)
    _commit(state, tmp_path, 2)
    ids = probe_token_ids(bpe_tokenizer)
    daemon = _logits(model, ids)
    hash_before = state.weights_sha256()

    info = export_adapter(_loaded(model, bpe_tokenizer), state, tmp_path / "adapter")

    assert state.weights_sha256() == hash_before  # the live model is never touched
    assert (info.version, info.truncated) == (2, False)
    assert info.rank == min(weight_in_out(model.get_submodule(names[0])).shape)
    assert info.logit_error.max_abs < LOGIT_ATOL and info.logit_error.prompts == len(PROBE_PROMPTS)
    config = json.loads((info.out_dir / ADAPTER_CONFIG_NAME).read_text())
    assert config["r"] == config["lora_alpha"] == info.rank and config["target_modules"] == names
    assert config["fan_in_fan_out"] is (model_type == "gpt2")
    written = json.loads((info.out_dir / EXPORT_INFO_NAME).read_text())
    assert (written["format"], written["version"], written["weights_sha256"]) == ("peft", 2, hash_before)

    base, _ = engine_tiny_lm(model_type)  # the same seed: the base weights the daemon started from
    base_logits = _logits(base, ids)
    assert _max_diff(base_logits, daemon) > 100 * LOGIT_ATOL  # the edits show in the logits
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(base, str(info.out_dir)).eval()
        assert _max_diff(_logits(peft_model, ids), daemon) < LOGIT_ATOL
        merged = peft_model.merge_and_unload()
    # Merged in float32: the daemon's weights bit for bit, but for the elements the export counted, where
    # base and master lie so far apart (a weight near 0 that the edit moved across 0) that no float32
    # delta added to the base lands on the master; there they differ in the last place of the delta.
    differ, edited = 0, 0
    base, _ = engine_tiny_lm(model_type)  # a fresh base: merging wrote into the one the adapter was loaded on
    for name in names:
        got, want = weight_in_out(merged.get_submodule(name)), weight_in_out(model.get_submodule(name))
        differ += int((got != want).sum())
        edited += want.numel()
        delta = want - weight_in_out(base.get_submodule(name))
        assert bool(((got - want).abs() <= delta.abs() * 2**-23 + 1e-12).all())
    assert differ == info.merged_mismatches < edited


def test_a_truncated_adapter_states_its_measured_error(engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    _commit(state, tmp_path, 2, rank=3)  # two rank-3 commits: the delta has rank 6 per module
    loaded = _loaded(model, bpe_tokenizer)
    ids = probe_token_ids(bpe_tokenizer)
    daemon = _logits(model, ids)

    auto = export_adapter(loaded, state, tmp_path / "auto", rank="auto")
    cut = export_adapter(loaded, state, tmp_path / "cut", rank=2)

    assert (auto.rank, auto.truncated) == (6, True) and auto.logit_error.max_abs < LOGIT_ATOL
    written = json.loads((cut.out_dir / EXPORT_INFO_NAME).read_text())
    assert written["rank"] == 2 and written["truncated"] is True
    assert {m["numerical_rank"] for m in written["modules"].values()} == {6}
    assert all(0 < m["relative_error"] < 1 for m in written["modules"].values())
    assert cut.logit_error.max_abs > 100 * LOGIT_ATOL  # rank 2 of 6 loses something, and says how much
    assert written["logit_error"]["max_abs"] == cut.logit_error.max_abs
    # The stated error is what the peft library's model shows on the same prompts.
    for adapter, stated in ((auto.out_dir, auto.logit_error.max_abs), (cut.out_dir, cut.logit_error.max_abs)):
        base, _ = engine_tiny_lm("llama")
        with torch.no_grad():
            peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
            assert _max_diff(_logits(peft_model, ids), daemon) == pytest.approx(stated, abs=LOGIT_ATOL)


def test_an_older_version_exports_from_its_staged_weights(engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    history, refs = _commit(state, tmp_path, 3)
    staged, _, _ = history.stage_version(1, refs)

    info = export_adapter(_loaded(model, bpe_tokenizer), state, tmp_path / "v1", staged=staged)

    assert (info.version, info.weights_sha256) == (1, refs[1].weights_sha256)
    history.revert_to(1, refs, record=lambda: None)
    ids = probe_token_ids(bpe_tokenizer)
    base, _ = engine_tiny_lm("llama")
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(base, str(info.out_dir)).eval()
        assert _max_diff(_logits(peft_model, ids), _logits(model, ids)) < LOGIT_ATOL


def test_bad_ranks_and_directories_are_refused(engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    loaded = _loaded(model, bpe_tokenizer)
    smallest = min(min(weight_in_out(model.get_submodule(n)).shape) for n in names)
    with pytest.raises(ExportError, match=f"exceeds the smallest edited weight's full rank {smallest}"):
        export_adapter(loaded, state, tmp_path / "a", rank=smallest + 1)
    with pytest.raises(ExportError, match="expected a whole number >= 1"):
        export_adapter(loaded, state, tmp_path / "a", rank=0)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_adapter(loaded, state, taken)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert (taken / "x").read_text() == "keep"


def test_version_zero_is_an_adapter_that_adds_nothing(engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    info = export_adapter(_loaded(model, bpe_tokenizer), state, tmp_path / "v0", rank="auto")
    assert (info.version, info.rank, info.logit_error.max_abs) == (0, 1, 0.0)
    from safetensors.torch import load_file

    tensors = load_file(info.out_dir / ADAPTER_WEIGHTS_NAME)
    for name in names:
        lora_a, lora_b = (tensors[f"base_model.model.{name}.lora_{part}.weight"] for part in "AB")
        assert lora_a.shape[0] == lora_b.shape[1] == 1 and not bool((lora_b @ lora_a).any())


def test_exact_delta_lands_on_the_master_where_float32_allows() -> None:
    base = torch.tensor([1.0, 0.3, -0.066680908203125, 1e-3])
    master = torch.tensor([1.0 + 2**-23, 0.30000001, 0.017113832756876945, 1e-3 + 2**-30])
    delta = exact_delta(base, master)
    landed = (base + delta) == master
    assert bool(landed[0]) and bool(landed[1]) and bool(landed[3])
    # b and m of opposite signs far apart: no float32 D gives m exactly; the nearest is kept
    assert float(delta[2]) == pytest.approx(float(master[2] - base[2]), rel=1e-6)


def test_factorise_is_exact_at_full_rank_and_optimal_when_truncated() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 5, generator=gen) @ torch.randn(5, 12, generator=gen)
    full = factorise(delta, None)
    assert torch.equal((full.lora_b @ full.lora_a).T, delta) and full.numerical_rank == 5
    wide = factorise(delta.T.contiguous(), None)  # out < in: the identity goes on the other side
    assert torch.equal((wide.lora_b @ wide.lora_a).T, delta.T)
    cut = factorise(delta, 2)
    singular = torch.linalg.svdvals(delta.double())
    best = float(singular[2:].square().sum().sqrt() / singular.square().sum().sqrt())  # Eckart-Young
    assert cut.relative_error == pytest.approx(best, rel=1e-6)
    assert cut.lora_a.shape == (2, 8) and cut.lora_b.shape == (12, 2)


def test_a_config_cannot_mix_linear_and_conv1d(engine_tiny_lm: Any) -> None:
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    conv = type("Conv1D", (torch.nn.Module,), {})()
    state.modules = {**state.modules, "fake": conv}
    with pytest.raises(ModelMismatch, match="cannot mix Linear and Conv1D"):
        adapter_config(state, 4, None)


def test_measuring_the_error_runs_none_of_the_live_models_hooks(
    engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path
) -> None:
    """An editor may hold hooks on the live modules (capturing activations) while the publisher exports."""
    model, names = engine_tiny_lm("llama")
    state = WeightState(model, names)
    _commit(state, tmp_path, 1)
    calls: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda *_, n=name: calls.append(n)) for name in names
    ]
    try:
        info = export_adapter(_loaded(model, bpe_tokenizer), state, tmp_path / "adapter")
        assert calls == [] and info.logit_error.positions > 0
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert calls == names  # the hooks are live on the model: only the shadow skipped them
    finally:
        for handle in handles:
            handle.remove()
