"""The SAE architectures by name; torch-free until an architecture is asked for.

Each architecture is one module (``saes/<name>.py``) holding everything about it: its
hyperparameters, its default grid, its math, its optional fused CPU step, its SAELens export name
and its memory hint. It registers itself with :func:`register` when imported. Three kinds:

* built-ins: every architecture module of this package; their declarations are derived from the
  modules and cached by :mod:`.declare`;
* plugins: an installed package that declares an entry point in the group
  ``saesweep.architectures`` (``name = "package.module"``) is loaded when its name is asked for,
  by every command;
* anything else imported that registers itself (a test's throwaway).

Configuration needs only an architecture's *declaration* (:func:`declaration`: its
hyperparameters, grid and whether ``sparsity_coeff`` applies), which for the built-ins comes from
:func:`.declare.declarations`: so configs, grids and ``saesweep grid`` import no torch once the
package's sources have been seen.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from saesweep.saes import declare

if TYPE_CHECKING:
    from saesweep.saes.base import PackedSAE

#: the entry-point group through which an installed package adds architectures
ENTRY_POINT_GROUP = "saesweep.architectures"


def declarations() -> dict[str, dict[str, Any]]:
    """The built-ins' declarations by name, in display order (see :mod:`.declare`)."""
    return declare.declarations(registered)


def builtin() -> tuple[str, ...]:
    """The built-in architectures, in display order."""
    return tuple(declarations())


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


def registered() -> dict[str, type[PackedSAE]]:
    """The architectures registered so far (imports nothing)."""
    return dict(_REGISTRY)


def _load_builtin() -> dict[str, type[PackedSAE]]:
    global _loaded
    if not _loaded:
        for d in declarations().values():
            importlib.import_module(f"saesweep.saes.{d['module']}")
        _loaded = True
    return _REGISTRY


@lru_cache(maxsize=1)
def _plugins() -> dict[str, Any]:
    """The installed packages' architectures: name -> entry point (nothing imported)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_plugin(name: str) -> None:
    ep = _plugins().get(name)
    if ep is None or name in _REGISTRY:
        return
    obj = ep.load()  # a module registers its classes on import; a class is registered here
    if isinstance(obj, type) and name not in _REGISTRY:
        register(obj)
    if name not in _REGISTRY:
        raise ValueError(f"sae_type {name!r}: the entry point {ep.value!r} ({ENTRY_POINT_GROUP}) registered no "
                         f"architecture of that name")


def unknown(name: str) -> ValueError:
    """The error for a ``sae_type`` no architecture has."""
    return ValueError(f"unknown sae_type {name!r}; choose from {', '.join(names())}")


def get(name: str) -> type[PackedSAE]:
    """The architecture's class (imports the built-in modules, and so torch)."""
    reg = _load_builtin()
    if name not in reg:
        _load_plugin(name)
    try:
        return reg[name]
    except KeyError:
        raise unknown(name) from None


def names() -> list[str]:
    """Every architecture, built-ins first in display order, then the others registered or
    installed (imports none of them)."""
    builtins = builtin()
    extra = [n for n in _REGISTRY if n not in builtins]
    return [*builtins, *extra, *(n for n in _plugins() if n not in builtins and n not in extra)]


@dataclass(frozen=True)
class Declaration:
    """What configuration needs of an architecture, without its module."""

    name: str
    hyperparams: dict[str, HyperParam]
    uses_sparsity_coeff: bool
    resample_until: float  # the default of train.resample_until for this architecture
    revision: int = 0  # PackedSAE.revision: part of the trial id when not 0
    classic: bool = False  # run by a sweep that names no types
    grid: dict[str, list] = field(default_factory=dict)  # default grid beyond the common axes


def _declaration_of(cls) -> Declaration:
    return Declaration(cls.name, dict(cls.hyperparams), bool(cls.uses_sparsity_coeff), float(cls.resample_until),
                       int(cls.revision), bool(cls.classic), dict(cls.grid))


def _declared(name: str) -> Declaration:
    from saesweep.saes.hparam_types import VALUE_TYPES

    d = declarations()[name]
    params = {k: HyperParam(VALUE_TYPES[t], default, help_, optional, per_member)
              for k, (t, default, help_, optional, per_member) in d["hyperparams"].items()}
    return Declaration(name, params, d["uses_sparsity_coeff"], d["resample_until"], d["revision"], d["classic"],
                       dict(d["grid"]))


def declaration(name: str) -> Declaration:
    """The declaration of ``name``: from its class when it is registered (a plugin, or a
    built-in already imported), else from :func:`.declare.declarations` (no torch)."""
    cls = _REGISTRY.get(name)
    if cls is not None:
        return _declaration_of(cls)
    if name in declarations():
        return _declared(name)
    if name in _plugins():
        _load_plugin(name)
        return _declaration_of(_REGISTRY[name])
    raise unknown(name)


def hyperparams(name: str) -> dict[str, HyperParam]:
    """The hyperparameters ``name`` takes beyond lr / dict_size_ratio / sparsity_coeff."""
    return declaration(name).hyperparams


def all_hyperparams() -> dict[str, HyperParam]:
    """Union of the architecture-specific hyperparameters (a name means one thing everywhere)."""
    out: dict[str, HyperParam] = {}
    for n in names():
        for key, hp in declaration(n).hyperparams.items():
            if key in out and (out[key].type, out[key].optional) != (hp.type, hp.optional):
                raise TypeError(f"hyperparameter {key!r} declared with two different types")
            out.setdefault(key, hp)
    return out
