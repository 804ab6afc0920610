"""`python -m editing.train` keeps its name; the command reads the settings, so it is `daemon.commands.train`.

This entry module and `editing/evaluate.py` are the only places in `editing/` that import the daemon
(the layering contract in pyproject.toml lists them as its only exceptions): nothing in the package uses them.
"""

from daemon.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
