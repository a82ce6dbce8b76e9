"""SAE architectures, one module each, behind a registry.

Adding an architecture (TopK, JumpReLU, ...) is one new module: subclass
:class:`~saesweep.saes.base.PackedSAE`, declare its extra ``hyperparams``, decorate it with
``@register`` and import it below. Its hyperparameters become config fields automatically.
"""

from __future__ import annotations

from .base import LOSS_CONVENTION, HyperParam, Losses, PackedSAE

REGISTRY: dict[str, type[PackedSAE]] = {}


def register(cls: type[PackedSAE]) -> type[PackedSAE]:
    if cls.name in REGISTRY:
        raise ValueError(f"SAE type {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[PackedSAE]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sae_type {name!r}; choose from {', '.join(REGISTRY)}") from None


def names() -> list[str]:
    return list(REGISTRY)


def all_hyperparams() -> dict[str, HyperParam]:
    """Union of the architecture-specific hyperparameters (a name means one thing everywhere)."""
    out: dict[str, HyperParam] = {}
    for cls in REGISTRY.values():
        for key, hp in cls.hyperparams.items():
            if key in out and (out[key].type, out[key].optional) != (hp.type, hp.optional):
                raise TypeError(f"hyperparameter {key!r} declared with two different types")
            out.setdefault(key, hp)
    return out


# the seed's four types; import order is the display order
from . import relu, hard_concrete, gated, gated_hard_concrete  # noqa: E402,F401

__all__ = ["LOSS_CONVENTION", "REGISTRY", "HyperParam", "Losses", "PackedSAE", "register", "get", "names", "all_hyperparams"]
