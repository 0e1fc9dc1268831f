"""Operator and developer tooling for preagg-refresh: the `preagg-refresh` CLI (cli.py), dead-letter
replay (replay.py) and the Docker-free local invoke and MSK event builder (local.py). Not deployed:
the function's zip carries only `src/handler/` (see docs/architecture.md)."""
