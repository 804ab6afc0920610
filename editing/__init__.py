"""Model editing: tensors and plain data in, tensors and numbers out. Knows nothing of the ledger or HTTP.

- `config.py`: the model, editor and gate configuration sections.
- `loading.py`: loading a causal LM and tokenizer (hub id, directory, GGUF, the default SmolLM2 GGUF).
- `targets.py`: the default edited modules per architecture (data), and the Linear/Conv1D orientation.
- `errors.py`: domain errors.
"""
