"""Synthetic activations: sparse combinations of known ground-truth directions.

Nothing is stored: batch ``k`` of a stream is generated from a generator seeded by
``(source.seed, seed, k)``, so any batch can be produced directly (resume, packs) and two
runs with the same seeds see identical data.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from saesweep.config.experiment import SyntheticSource
from saesweep.data.base import Activations, norm_scale

_EVAL_STREAM = 2**31 - 1  # the held-out stream's seed; training seeds are smaller
#: offset of the ground-truth dictionary's generator seed: a dictionary drawn with the bare
#: ``seed`` would equal the decoder initialisation of an SAE trained with the same seed (both
#: are rows of ``randn(., d)``), so every feature would count as "recovered" before training.
_DICTIONARY_STREAM = 0x5EED_D1C7


class SyntheticActivations(Activations):
    def __init__(self, cfg: SyntheticSource, eval_tokens: int, norm_sample: int = 32_768) -> None:
        self.cfg = cfg
        self.d_in = cfg.d_in
        g = torch.Generator().manual_seed(cfg.seed + _DICTIONARY_STREAM)
        dirs = torch.randn(cfg.n_features, cfg.d_in, generator=g)
        self.ground_truth = dirs / dirs.norm(dim=-1, keepdim=True)
        self.eval_tokens = eval_tokens
        self.scale = 1.0
        sample = self._raw(norm_sample, _EVAL_STREAM - 1, 0)
        self.scale = norm_scale(sample)
        self._mean = (sample * self.scale).mean(0)

    def _raw(self, n: int, seed: int, k: int) -> Tensor:
        g = torch.Generator().manual_seed(hash((self.cfg.seed, seed, k)) & 0x7FFF_FFFF_FFFF_FFFF)
        r = torch.rand(n, self.cfg.n_features, generator=g)
        p = self.cfg.sparsity
        # active with probability p; given active, r / p ~ U(0, 1) -> magnitude in [lo, hi]
        lo, hi = self.cfg.min_magnitude, self.cfg.max_magnitude
        codes = torch.where(r < p, lo + (hi - lo) * (r / p), torch.zeros(()))
        x = codes @ self.ground_truth
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(n, self.d_in, generator=g)
        return x

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        k = start
        while True:
            yield self._raw(batch_size, seed, k) * self.scale
            k += 1

    def eval_activations(self) -> Tensor:
        return self._raw(self.eval_tokens, _EVAL_STREAM, 0) * self.scale

    def mean(self) -> Tensor:
        return self._mean

    def describe(self) -> dict:
        return {**super().describe(), "kind": "synthetic", "n_features": self.cfg.n_features, "true_l0": self.cfg.true_l0}
