# `python -m ingest` keeps its name; the command needs the settings, so it lives in daemon.commands.ingest.
from daemon.commands.ingest import main

raise SystemExit(main())
