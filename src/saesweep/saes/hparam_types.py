"""Value types of architecture hyperparameters beyond int, float, bool and str.

Torch-free: the config validates hyperparameter values (and ``saesweep grid`` expands grids)
without importing the architectures; :mod:`.declare` names these types.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.0625,0.25,1"`` -> (0.0625, 0.25, 1.0): increasing, in (0, 1], ending at 1."""
    try:
        fr = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated fractions such as '0.125,0.5,1', got {text!r}") from None
    if not fr or fr[0] <= 0 or fr[-1] != 1.0 or any(a >= b for a, b in zip(fr, fr[1:])):
        raise ValueError(f"fractions must increase within (0, 1] and end at 1, got {text!r}")
    return fr


#: Matryoshka's nested group boundaries, as a normalised comma-separated string
GroupFractions = Annotated[str, AfterValidator(lambda s: ",".join(f"{v:g}" for v in parse_fractions(s)))]

#: every value type a declaration may name (see :mod:`.declare`)
VALUE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "group_fractions": GroupFractions}
