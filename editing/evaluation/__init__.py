"""Evaluation of editing methods side by side (`python -m editing.evaluate`; docs/evaluation.md).

- `methods.py`: the compared methods as data (`METHODS`), variants, and preparing each one (training,
  checkpoints, reuse of trained editors).
- `scores.py`: the per-batch scores (paper metrics and clean variants) and their pooling.
- `harness.py`: one method over a stream of edit batches, sequential or batch mode, measured on the final model.
- `runner.py`: one evaluation run over several methods with the same facts, order and seed.
- `locality.py`: the locality measures against the unedited model (confident retention, KL, known facts,
  probe flips), the reference they need and the null edits' facts (docs/locality.md).
- `report.py`: the JSON report, the Markdown table and the plot; `locality_section.py` its locality part.
"""
