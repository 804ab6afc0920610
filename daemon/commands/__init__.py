"""Command-line tools whose names live in the lower packages, kept here because they need the settings.

`ingest` and `editing` know nothing of the daemon (the layering `make lint` checks), but these tools
read `config.toml` and start like every other entry point (`daemon.bootstrap`). Each module is argument
parsing plus calls; the command name users know is a two-line entry module in the package it names:

- `ingest.py`: `python -m ingest FILE_OR_URL...` (entry: `ingest/__main__.py`).
- `train.py`: `python -m editing.train` (entry: `editing/train.py`).
- `evaluate.py`: `python -m editing.evaluate` (entry: `editing/evaluate.py`).
- `config.py`: `python -m daemon.config` (entry: the `__main__` block of `daemon/config.py`).

`python -m daemon` (`daemon/cli.py`) and `python -m daemon.ledger` (`daemon/ledger.py`) sit in `daemon/`.
"""
