"""The SAE architectures by name; torch-free until an architecture is asked for.

Each architecture is one module (``saes/<name>.py``) holding everything about it: its
hyperparameters, its math, its optional fused CPU step, its SAELens export name and its memory
hint. It registers itself with :func:`register` when imported. The built-in modules (the
seed's four, then TopK, BatchTopK, JumpReLU, Matryoshka) are imported on the first :func:`get`,
in :data:`BUILTIN` order (the display order); another one (a plugin, or a test's throwaway)
registers itself by being imported, and becomes a ``sae_type`` the config, grids, trainer and
export all accept.

Configuration needs only an architecture's *declaration* (:func:`declaration`: its
hyperparameters and whether ``sparsity_coeff`` applies), which for the built-ins comes from
:mod:`.declared`, generated from the modules (``python -m saesweep.saes.registry``, checked
equal by tests/saes/test_registry.py): so configs, grids and ``saesweep grid`` import no torch.
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
    """The architecture's class (imports the built-in modules, and so torch)."""
    reg = _load_builtin()
    try:
        return reg[name]
    except KeyError:
        raise ValueError(f"unknown sae_type {name!r}; choose from {', '.join(names())}") from None


def names() -> list[str]:
    """Every architecture, built-ins first in display order (imports none of them)."""
    extra = [n for n in _REGISTRY if n not in BUILTIN]
    return [*BUILTIN, *extra]


@dataclass(frozen=True)
class Declaration:
    """What configuration needs of an architecture, without its module."""

    name: str
    hyperparams: dict[str, HyperParam]
    uses_sparsity_coeff: bool
    resample_until: float  # the default of train.resample_until for this architecture
    revision: int = 0  # PackedSAE.revision: part of the trial id when not 0


def declaration(name: str) -> Declaration:
    """The declaration of ``name``: from its class when it is registered (a plugin, or a
    built-in already imported), else from :mod:`.declared` (no import, no torch)."""
    cls = _REGISTRY.get(name)
    if cls is not None:
        return Declaration(name, dict(cls.hyperparams), bool(cls.uses_sparsity_coeff), float(cls.resample_until),
                           int(cls.revision))
    if name not in BUILTIN:
        raise ValueError(f"unknown sae_type {name!r}; choose from {', '.join(names())}")
    from saesweep.saes.declared import DECLARED
    from saesweep.saes.hparam_types import VALUE_TYPES

    uses, until, revision, params = DECLARED[name]
    return Declaration(name, {k: HyperParam(VALUE_TYPES[t], default, help_, optional, per_member)
                              for k, (t, default, help_, optional, per_member) in params.items()}, uses, until, revision)


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


# ----------------------------------------------------------------- the generated declarations
def declared_source() -> str:
    """The text of :mod:`.declared`, from the built-in modules as they are now."""
    from saesweep.saes.hparam_types import VALUE_TYPES

    type_name = {v: k for k, v in VALUE_TYPES.items()}
    lines = [
        '"""Generated by ``python -m saesweep.saes.registry`` from the architecture modules: do not edit.',
        "",
        "The built-in architectures' declarations (whether ``sparsity_coeff`` applies, the default",
        "``train.resample_until``, the revision, and each hyperparameter as (type, default, help, optional,",
        "per_member)), so that configuration needs",
        "no architecture module and no torch; tests/saes/test_registry.py checks them against the modules.",
        '"""',
        "",
        "DECLARED = {",
    ]
    for name in BUILTIN:
        cls = get(name)
        lines.append(f"    {name!r}: ({bool(cls.uses_sparsity_coeff)!r}, {float(cls.resample_until)!r}, "
                     f"{int(cls.revision)!r}, {{")
        for k, hp in cls.hyperparams.items():
            lines.append(f"        {k!r}: ({type_name[hp.type]!r}, {hp.default!r}, {hp.help!r}, {hp.optional!r}, "
                         f"{hp.per_member!r}),")
        lines.append("    }),")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # regenerate saes/declared.py after changing an architecture's fields
    from pathlib import Path

    from saesweep.saes import registry  # the package's module, where the architectures register

    path = Path(__file__).with_name("declared.py")
    path.write_text(registry.declared_source())
    print(f"wrote {path}")
