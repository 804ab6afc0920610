"""The EMSEdit engine: turns a batch of facts into a weight update.

- `hypernet.py`: the hypernetwork (keys and gradients in, pseudo-pairs out).
- `solve.py`: the ridge solve that aggregates pseudo-pairs into one ΔW.
- `emsedit.py`: the multi-step editor (`EMSEditor.propose`), one hypernetwork per step.
- `edit_memory.py`, `key_covariance.py`: the preservation terms of the solve.
- `deltas.py`: edit plans and how they reach the model (apply, restore).
- `training.py`, `synthetic.py`: meta-training and the built-in synthetic facts to train on.
- `checkpoint.py`: self-describing editor checkpoints.
"""
