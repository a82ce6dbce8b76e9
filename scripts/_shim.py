"""Shared by the classic script names: run a saesweep subcommand with the script's arguments.

The classic command lines start with a plain ``python scripts/...``. When that Python cannot import
saesweep (or what it needs, such as torch) and the project's ``.venv`` (made by
``bash scripts/setup.sh``) exists, the script runs itself again with ``.venv/bin/python`` and
says so on stderr.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"


def _reexec_in_venv(error: ModuleNotFoundError) -> None:
    python = VENV / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if not python.exists() or in_venv:
        print(f"{Path(sys.argv[0]).name}: cannot import {error.name!r} with {sys.executable}; "
              "set up first with `bash scripts/setup.sh` (or activate its venv: source .venv/bin/activate)",
              file=sys.stderr)
        sys.exit(2)
    print(f"{Path(sys.argv[0]).name}: {error.name!r} is not importable with {sys.executable}; "
          f"re-running with {python} (activate it with `source .venv/bin/activate`)", file=sys.stderr)
    sys.stderr.flush()
    os.execv(str(python), [str(python), sys.argv[0], *sys.argv[1:]])


#: what every command needs besides saesweep itself (the CLI imports it only when a command runs)
NEEDS = ("torch", "optuna")


def _import_main():
    import importlib.util

    from saesweep.cli.app import main

    for name in NEEDS:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return main


def run(subcommand: str, *defaults: str) -> None:
    """``defaults`` are flags added unless the user gave that flag (e.g. ``--policy round_robin``)."""
    try:
        main = _import_main()
    except ModuleNotFoundError as e:
        if e.name != "saesweep":
            _reexec_in_venv(e)
        sys.path.insert(0, str(REPO / "src"))  # not installed: the source tree next to this script
        try:
            main = _import_main()
        except ModuleNotFoundError as e2:
            _reexec_in_venv(e2)
    args = sys.argv[1:]
    extra = []
    for i in range(0, len(defaults), 2):
        name = defaults[i]
        if not any(a == name or a.startswith(name + "=") or a == name.replace("_", "-") for a in args):
            extra += [name, defaults[i + 1]]
    sys.exit(main([subcommand, *args, *extra]))
