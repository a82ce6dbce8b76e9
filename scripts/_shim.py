"""Shared by the seed's script names: run a saesweep subcommand with the script's arguments."""

import sys
from pathlib import Path


def run(subcommand: str, *defaults: str) -> None:
    """``defaults`` are flags added unless the user gave that flag (e.g. ``--policy round_robin``)."""
    try:
        from saesweep.cli import main
    except ModuleNotFoundError:  # not installed: use the source tree next to this script
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from saesweep.cli import main
    args = sys.argv[1:]
    extra = []
    for i in range(0, len(defaults), 2):
        name = defaults[i]
        if not any(a == name or a.startswith(name + "=") or a == name.replace("_", "-") for a in args):
            extra += [name, defaults[i + 1]]
    sys.exit(main([subcommand, *args, *extra]))
