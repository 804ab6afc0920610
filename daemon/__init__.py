"""The lifelong knowledge-editing daemon: configuration, logging, the service and its command-line tools.

- `config.py`: settings (config.toml + KED_* environment), one typed section per component.
- `logs.py`: structlog set-up, called once by an entry point.
- `cli.py`: `python -m daemon` argument parsing and start-up.
- `service.py`: the service object and its lifecycle.
- `ledger.py`: `python -m daemon.ledger`, the ledger command-line tool.
"""
