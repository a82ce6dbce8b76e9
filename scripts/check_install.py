"""Check that the install the README makes holds everything saesweep imports.

Run with the Python of a venv made by ``bash scripts/setup.sh`` alone (no test extras):

    .venv/bin/python scripts/check_install.py

1. Every module of the package imports. A module may fail only for a module that an extra
   outside that install provides (:data:`OUTSIDE_INSTALL`).
2. Every import anywhere in the package's sources, also those inside functions, names a
   standard-library module, saesweep itself, or a distribution the package declares for this
   install (its dependencies and the ``all`` extra), or is one of :data:`OUTSIDE_INSTALL`.

Exits 1 with one line per problem.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import pkgutil
import re
import sys
from pathlib import Path

#: imports that are deliberately not part of the default install, and why; the code that makes
#: them either lives in a module only they need or asks for them with a message
OUTSIDE_INSTALL = {
    "sae_lens": "the bench extra (SAELens's classes for the types it lacks; export registers them when installed)",
    "sklearn": "optional: the fanova importance evaluator, with a fallback and a message",
    "psycopg2": "optional: the older PostgreSQL driver, used only when it is the one installed",
}
INSTALLED_EXTRAS = ("all", "wandb", "postgres", "slurm", "dashboard", "gpu")
#: installed by scripts/setup.sh beside the package (its metadata pins an old numpy)
SETUP_EXTRAS = {"sweeps"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """The distributions saesweep declares for the default install."""
    out = set()
    for req in md.requires("saesweep") or []:
        name, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra and extra.group(1) not in INSTALLED_EXTRAS:
            continue
        base = re.match(r"[A-Za-z0-9_.\-]+", name.strip())
        if base and base.group(0) != "saesweep":
            out.add(_norm(base.group(0)))
    return out


def imported_names(root: Path) -> dict[str, list[str]]:
    """Top-level names imported anywhere under ``root`` -> where."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], []).append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def main() -> int:
    import saesweep

    problems = []
    pkg_dir = Path(saesweep.__file__).parent
    for info in pkgutil.walk_packages([str(pkg_dir)], "saesweep."):
        if info.name.endswith(".__main__"):  # runs the command line when imported
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in OUTSIDE_INSTALL:
                problems.append(f"import {info.name}: {e}")
        except Exception as e:  # noqa: BLE001 - any failure to import is a problem
            problems.append(f"import {info.name}: {type(e).__name__}: {e}")
    want = declared()
    providers = md.packages_distributions()
    for name, where in sorted(imported_names(pkg_dir).items()):
        if name in sys.stdlib_module_names or name == "saesweep" or name in OUTSIDE_INSTALL:
            continue
        dists = {_norm(d) for d in providers.get(name, [])}
        if name in SETUP_EXTRAS and dists:
            continue
        if not dists & want:
            has = f"installed only through {', '.join(sorted(dists))}" if dists else "not installed"
            problems.append(f"{where[0]}: imports {name}, which no declared dependency provides ({has}); "
                            f"declare it in pyproject.toml")
    for p in problems:
        print(f"check_install: {p}")
    if not problems:
        print(f"check_install: every module imports; every import is declared ({len(want)} distributions)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
