"""The versioned model state and the exact-revert path (docs/model-state.md, "The exact-revert path").

Read in this order:

1. `weights.py`: the live edited weights with fp32 master copies, exact publishing and the weights hash.
2. `lowrank.py`: how a commit's ΔW is stored, as int16 low-rank factors that rebuild bit for bit.
3. `store.artefacts` and `store.retention` (the ledger's side): artefact files named by sha256,
   snapshots and pruning.
4. `history.py`: `ModelHistory`, the crash-safe commit protocol, rebuilds, exact reverts and recovery.
5. `daemon.model_state`: the wiring of the history to the ledger's versions in the running service.
6. `export.py`: any reachable version written as a standard Hugging Face directory.
"""
