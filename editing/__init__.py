"""Model editing: tensors and plain data in, tensors and numbers out. Knows nothing of the ledger or HTTP.

The rooms, each a sub-package:

- `model/`: the language model as the editor sees it: loading (hub id, directory, GGUF), the edited
  modules per architecture (`targets`), tokenisation, tracing keys and gradients, cheap scoring
  forwards and the teacher-forced edit metrics (`edit_metrics`).
- `engine/`: the EMSEdit editor: the hypernetwork, the ridge solve, the multi-step editor, the edit
  memory and key covariance, edit plans (`deltas`), meta-training, the synthetic training facts and
  self-describing checkpoints.
- `gate/`: the commit gate: its configuration, per-batch checks and bisection (`checks`), one batch
  through the gate (`batch_edit`), specificity against the frozen base model, periodic probes.
- `state/`: the versioned model state and the exact-revert path: live weights with fp32 masters and
  their hash (`weights`), the stored low-rank form of deltas (`lowrank`), the commit protocol,
  rebuilds and reverts (`history`), and export to a Hugging Face directory (`export`).
- `evaluation/`: `python -m editing.evaluate`: methods side by side, reports, margins, and the
  baseline editors (`evaluation/baselines/`).

At the top: `config.py` (the model and editor configuration sections), `data.py` (edit examples and
the loaders of ZsRE/CounterFact files) and `errors.py` (domain errors). `train.py` and `evaluate.py`
keep the command names `python -m editing.train` and `python -m editing.evaluate`.
"""
