"""The language model as the editor sees it: loading, edited modules, tokenisation, tracing and scoring.

- `loading.py`: the only place that knows where models come from (hub id, directory, GGUF file).
- `targets.py`: the default edited modules per architecture (data), and the Linear/Conv1D orientation.
- `tokenise.py`: teacher-forced tokenisation of (prompt, answer) pairs.
- `tracing.py`: capturing keys and output gradients of the edited modules (the only place with hooks).
- `scoring.py`: forward passes that score answers and next-token distributions cheaply.
- `edit_metrics.py`: teacher-forced edit metrics (efficacy, generalisation, locality) from logits.
"""
