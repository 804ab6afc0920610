"""First-run training: the editor the daemon trains when it finds no trained checkpoint.

When `<state_dir>/editor` (or `[editor] checkpoint`) holds no checkpoint, the daemon meta-trains an
editor for the loaded model on `[edit_loop] training_data` (built-in synthetic counterfactual facts by
default), saves it as an ordinary checkpoint (the same files, written the same atomic way, as
`python -m editing.train`: `daemon.bootstrap.save_editor`), and edits with it from then on; loading a
checkpoint is `daemon.bootstrap.load_editor`. Training works on a private copy of the language model,
because it changes the edited weights in place while it runs: the live model keeps answering queries
meanwhile.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import structlog

from daemon.bootstrap import save_editor
from daemon.config import Settings
from editing.data import examples_hash, load_examples
from editing.engine.checkpoint import WEIGHTS_FILE, checkpoint_info
from editing.engine.emsedit import EMSEditor
from editing.engine.training import TrainingOptions, meta_train
from editing.model.loading import LoadedModel

log = structlog.get_logger(__name__)

Progress = Callable[[int, int, float], None]


class TrainingStopped(Exception):
    """The service was asked to stop while it trained the editor; nothing was saved."""


def checkpoint_exists(directory: Path) -> bool:
    """True when `directory` holds an editor checkpoint (its description file)."""
    return (directory / "editor_config.json").is_file()


def checkpoint_id(directory: Path) -> str:
    """A short identity of a checkpoint (sha256 prefix of its weights file), recorded with every commit."""
    digest = hashlib.sha256()
    with (directory / WEIGHTS_FILE).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def training_options(settings: Settings) -> TrainingOptions:
    """First-run training: the engine's defaults, `[edit_loop] training_batches` batches of `[editor] batch_size`."""
    return TrainingOptions(
        n_batches=settings.edit_loop.training_batches,
        batch_size=settings.editor.batch_size,
        seed=settings.editor.seed,
    )


def train_editor(
    settings: Settings,
    loaded: LoadedModel,
    module_names: list[str],
    *,
    progress: Progress,
    stop: threading.Event,
) -> Path:
    """Meta-train an editor on a copy of the model and save it to `settings.editor_checkpoint()`.

    `progress(done, total, loss)` is called after each training batch. Raises TrainingStopped when
    `stop` is set (checked after every batch); DataFormatError for unusable training data.
    """
    began = time.monotonic()
    options = training_options(settings)
    examples = load_examples(
        settings.edit_loop.training_data,
        limit=options.n_batches * options.batch_size * options.epochs,
        seed=settings.editor.seed,
    )
    # A private copy: training moves the edited weights while it runs, and the live model serves queries.
    shadow = copy.deepcopy(loaded.model)
    editor = EMSEditor(shadow, loaded.tokenizer, module_names, settings.editor)

    def on_batch(done: int, total: int, loss: float) -> None:
        progress(done, total, loss)
        if stop.is_set():
            raise TrainingStopped("stopped while training the editor")

    log.info(
        "training the editor (first run)",
        data=settings.edit_loop.training_data,
        examples=len(examples),
        batches=options.n_batches,
        modules=len(module_names),
    )
    try:
        report = meta_train(editor, examples, options, on_batch=on_batch)
        training = {
            "data": settings.edit_loop.training_data,
            "data_hash": examples_hash(examples),
            "n_examples": len(examples),
            "options": asdict(options),
            "optimiser_steps": report.optimiser_steps,
            "key_covariance": editor.config.key_covariance,
            "trained_by": "daemon first run",
        }
        output = save_editor(
            settings.editor_checkpoint(),
            editor,
            checkpoint_info(editor, loaded.fingerprint, loaded.model_type, training),
        )
    finally:
        del editor, shadow
    log.info("editor trained", checkpoint=str(output), seconds=round(time.monotonic() - began, 1))
    return output
