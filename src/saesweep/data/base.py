"""The interface between activation sources and the trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from saesweep.data.lm import HookedLM

#: a function from raw activations ``[N, d]`` to their reconstruction ``[N, d]``
Reconstructor = Callable[[Tensor], Tensor]


@dataclass
class SplicePort:
    """What a language-model source offers the spliced CE/KL metrics: the model with its hook
    point (loaded on first use), the held-out token rows, the rows per LM batch, whether the
    rows start with BOS (its position is left out), and the clean and zero-ablated figures per
    batch that an earlier evaluation on the same rows measured (kept here between calls)."""

    load: Callable[[], "HookedLM"]
    rows: np.ndarray
    batch_rows: int
    skip_first: bool
    baseline: Optional[list[dict[str, float]]] = None
    _lm: Optional["HookedLM"] = field(default=None, repr=False)

    @property
    def lm(self) -> "HookedLM":
        if self._lm is None:
            self._lm = self.load()
        return self._lm

    def close(self) -> None:
        self._lm = None


def unit_scale(mean_sq_norm: float) -> float:
    """The factor s with E||s x||^2 = 1 given E||x||^2 (the loss convention's normalisation,
    see :data:`saesweep.saes.base.LOSS_CONVENTION`)."""
    if not math.isfinite(mean_sq_norm) or mean_sq_norm <= 0:
        raise ValueError("activations are all zero or not finite; cannot normalise")
    return math.sqrt(1.0 / mean_sq_norm)


def norm_scale(sample: Tensor) -> float:
    """The factor s with E||s x||^2 = 1 over ``sample``."""
    return unit_scale(sample.double().pow(2).sum(-1).mean().item())


class Activations:
    """Training and held-out activations of one source, already normalised by ``scale``.

    ``train_batches`` yields ``[batch_size, d_in]`` float32 CPU tensors in an order fixed by
    ``seed``, starting at batch ``start`` (so a resumed run sees the same stream).
    """

    d_in: int
    scale: float
    #: unit ground-truth directions ``[n_features, d_in]`` when the source knows them
    ground_truth: Optional[Tensor] = None

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        raise NotImplementedError

    def eval_activations(self) -> Tensor:
        """Held-out normalised activations ``[N, d_in]``."""
        raise NotImplementedError

    def mean(self) -> Tensor:
        """Mean of a sample of normalised training activations (initial decoder bias)."""
        raise NotImplementedError

    def splice_port(self) -> Optional[SplicePort]:
        """The language model to splice reconstructions into, and its held-out rows; None when
        this is not an LM source or its spliced metrics are off."""
        return None

    def describe(self) -> dict:
        return {"d_in": self.d_in, "scale": self.scale}

    def close(self) -> None:
        pass
