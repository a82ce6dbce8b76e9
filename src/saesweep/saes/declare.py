"""The built-in architectures' declarations, derived from their modules.

Every module of this package but the shared machinery (:data:`MACHINERY`) that registers an
architecture is a built-in. What configuration needs of each — its hyperparameters, its default
grid, whether it is a classic type, whether ``sparsity_coeff`` applies — is read from the modules
themselves: the first time a set of sources is seen, they are imported (and so torch) and the
declarations are kept as a small JSON file under the cache folder
(``$SAESWEEP_CACHE/declarations/<digest>.json``), named by a digest of the package's sources.
Later configs, grids and ``saesweep grid`` read that file and import no torch. Adding or
changing a module changes the digest, so there is no generated file to keep in step.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

#: modules of the package that hold shared machinery, not an architecture
MACHINERY = ("base", "declare", "hparam_types", "kernels", "registry")

PACKAGE_DIR = Path(__file__).parent


def architecture_modules() -> list[str]:
    """The package's modules that may hold an architecture (every module but the machinery)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if m.name not in MACHINERY and not m.ispkg)


def source_digest() -> str:
    """A digest of every module of the package: the declarations' cache key."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def discover(registered: Callable[[], dict[str, type]]) -> list[type]:
    """The architecture classes the package's modules define, in display order: each module is
    imported (and so torch), and ``registered()`` then names the classes it registered."""
    found = []
    for mod in architecture_modules():
        module = importlib.import_module(f"saesweep.saes.{mod}")
        found += [cls for cls in registered().values() if cls.__module__ == module.__name__]
    return sorted(set(found), key=lambda c: (c.order, c.name))


def _as_json(cls) -> dict[str, Any]:
    from saesweep.saes.hparam_types import VALUE_TYPES

    type_name = {v: k for k, v in VALUE_TYPES.items()}
    return {
        "module": cls.__module__.rsplit(".", 1)[-1],
        "uses_sparsity_coeff": bool(cls.uses_sparsity_coeff),
        "resample_until": float(cls.resample_until),
        "revision": int(cls.revision),
        "classic": bool(cls.classic),
        "grid": {k: list(v) for k, v in cls.grid.items()},
        "hyperparams": {k: [type_name[hp.type], hp.default, hp.help, hp.optional, hp.per_member]
                        for k, hp in cls.hyperparams.items()},
    }


def derive(registered: Callable[[], dict[str, type]]) -> dict[str, dict[str, Any]]:
    """The declarations of the modules as they are now, read from the classes (imports torch)."""
    return {cls.name: _as_json(cls) for cls in discover(registered)}


def _cache_file(digest: str) -> Path:
    from saesweep.settings import cache_root

    return cache_root() / "declarations" / f"{digest}.json"


def _write_atomically(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".declarations-")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: derived again next time


@lru_cache(maxsize=1)
def declarations(registered: Callable[[], dict[str, type]]) -> dict[str, dict[str, Any]]:
    """Every built-in's declaration, in display order: from the cache when the sources are the
    ones it was derived from, else derived now (``registered`` as for :func:`discover`) and cached."""
    digest = source_digest()
    path = _cache_file(digest)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(v, dict) and "hyperparams" in v for v in data.values()):
            return data
    except (OSError, ValueError):
        pass
    data = derive(registered)
    _write_atomically(path, data)
    return data

