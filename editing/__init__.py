"""Model editing: tensors and plain data in, tensors and numbers out. Knows nothing of the ledger or HTTP.

- `config.py`, `gate_config.py`: the model, editor and gate configuration sections.
- `loading.py`: loading a causal LM and tokenizer (hub id, directory, GGUF, the default SmolLM2 GGUF).
- `targets.py`: the default edited modules per architecture (data), and the Linear/Conv1D orientation.
- `data.py`, `synthetic.py`, `tokenise.py`: edit examples from ZsRE/CounterFact files or the built-in
  generator, and their teacher-forced tokenisation.
- `tracing.py`, `hypernet.py`, `solve.py`, `emsedit.py`, `deltas.py`: the EMSEdit engine
  (keys and gradients, the hypernetwork, the ridge solve, the multi-step editor, apply/restore).
- `training.py`, `train.py`, `checkpoint.py`: meta-training (`python -m editing.train`) and
  self-describing checkpoints.
- `metrics.py`, `baselines/`: evaluation metrics and baseline editors.
- `scoring.py`, `probe_sets.py`, `probes.py`, `specificity.py`, `gate.py`: the commit gate's
  measurements (answer likelihoods, GLUE-style probe sets, drift against the frozen base model) and
  its verdicts (per-batch checks, isolation of harmful facts by bisection).
- `weights.py`, `lowrank.py`, `history.py`, `export.py`: the live edited-weight state (fp32 masters,
  exact rebuilds), the stored form of deltas, the commit history, and export to a Hugging Face directory.
- `errors.py`: domain errors.
"""
