"""The ``saesweep`` command line: :mod:`.app` holds the command table, one module per group."""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from saesweep.cli.app import main as run_main

    return run_main(argv)
