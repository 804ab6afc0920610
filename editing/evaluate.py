"""`python -m editing.evaluate` keeps its name; the command starts like every other one, so it is
`daemon.commands.evaluate` (the evaluation itself is `editing.evaluation`).

This entry module and `editing/train.py` are the only places in `editing/` that import the daemon (the
layering contract in pyproject.toml lists them as its only exceptions): nothing in the package uses them.
"""

from daemon.commands.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
