"""The SAE architectures by name; torch-free until an architecture is asked for.

Each architecture is one module (``saes/<name>.py``) holding everything about it: its
hyperparameters, its math, its optional fused CPU step, its SAELens export name and its memory
hint. It registers itself with :func:`register` when imported. The built-in modules (the
seed's four, then TopK, BatchTopK, JumpReLU, Matryoshka) are imported on the first lookup, in :data:`BUILTIN` order (the display order);
another one (a plugin, or a test's throwaway) registers itself by being imported, and becomes
a ``sae_type`` the config, grids, trainer and export all accept.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saesweep.saes.base import PackedSAE

#: the built-in architectures' modules under ``saesweep.saes``, in display order
BUILTIN = ("relu", "hard_concrete", "gated", "gated_hard_concrete", "topk", "batchtopk", "jumprelu", "matryoshka")

_REGISTRY: dict[str, type[PackedSAE]] = {}
_loaded = False


@dataclass(frozen=True)
class HyperParam:
    """A hyperparameter that only some architectures take (``aux_coeff``, ``initial_beta``...)."""

    type: type
    default: Any
    help: str
    optional: bool = False  # None is a meaningful value (e.g. "no annealing")
    per_member: bool = True  # members of one pack may differ in it (else it is part of the pack key)


def register(cls: type[PackedSAE]) -> type[PackedSAE]:
    """Class decorator: make ``cls`` the architecture ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"SAE type {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget an architecture (tests register throwaway ones)."""
    _REGISTRY.pop(name, None)


def _load_builtin() -> dict[str, type[PackedSAE]]:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN:
            importlib.import_module(f"saesweep.saes.{mod}")
    return _REGISTRY


def get(name: str) -> type[PackedSAE]:
    reg = _load_builtin()
    try:
        return reg[name]
    except KeyError:
        raise ValueError(f"unknown sae_type {name!r}; choose from {', '.join(reg)}") from None


def names() -> list[str]:
    """Registered architectures, built-ins first in display order."""
    reg = _load_builtin()
    return sorted(reg, key=lambda n: (BUILTIN.index(n) if n in BUILTIN else len(BUILTIN), list(reg).index(n)))


def hyperparams(name: str) -> dict[str, HyperParam]:
    """The hyperparameters ``name`` takes beyond lr / dict_size_ratio / sparsity_coeff."""
    return dict(get(name).hyperparams)


def all_hyperparams() -> dict[str, HyperParam]:
    """Union of the architecture-specific hyperparameters (a name means one thing everywhere)."""
    out: dict[str, HyperParam] = {}
    for n in names():
        for key, hp in get(n).hyperparams.items():
            if key in out and (out[key].type, out[key].optional) != (hp.type, hp.optional):
                raise TypeError(f"hyperparameter {key!r} declared with two different types")
            out.setdefault(key, hp)
    return out
