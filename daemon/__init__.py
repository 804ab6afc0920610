"""The lifelong knowledge-editing daemon: configuration, start-up, the service and its command-line tools.

- `config.py`: settings (config.toml + KED_* environment), one typed section per component.
- `bootstrap.py`: start-up shared by every entry point (settings, logging, ledger, model, state, editor).
- `logs.py`: structlog set-up, called once by an entry point.
- `cli.py`: `python -m daemon` argument parsing and start-up.
- `service.py`, `edit_loop.py`, `first_run.py`: the service object, its edit loop and first-run training.
- `service_state.py`: the service's state in one place (editor, pause, drift) and the enums of its
  states and outcomes, read by the API and the metrics.
- `api*.py`, `http_server.py`: the HTTP API; `service_view.py` what it needs from the service, `view.py`
  and `ledger_view.py` what provides it, `querying.py` its answers from the model, `rejection_codes.py`
  the bounded codes of rejection reasons.
- `openai_api.py`, `openai_models.py`, `openai_guards.py`: the OpenAI-compatible routes (docs/serving.md);
  `served_model.py` serves one whole version per answer, `generation.py` is the decoding loop they share
  with `/v1/query`.
- `metrics.py`, `process_memory.py`: Prometheus metrics, computed at scrape time where they can be.
- `model_state.py`: the model history wired to the ledger's versions.
- `ledger.py`: `python -m daemon.ledger`, the ledger command-line tool.
- `commands/`: the other command-line tools (`python -m ingest`, `python -m editing.train`,
  `python -m editing.evaluate`, `python -m daemon.config`).
"""
