"""The commit gate: what an edit batch must show before it is committed, and the periodic probes.

- `config.py`: the `[gate]` configuration section.
- `batch_edit.py`: one edit batch through the gate on the live weights (`GatedEditor`).
- `checks.py`: measurements of an edited batch, verdicts, bisection of harmful facts (`BatchChecker`).
- `frozen_layers.py`: the layers below the edited ones, computed once per check.
- `specificity.py`: agreement and KL against the model before the batch and the frozen base model.
- `probe_sets.py`, `probes.py`: the GLUE-style probe sets and the periodic drift probes.
"""
