"""Synthetic activations: sparse combinations of known ground-truth directions.

Nothing is stored: batch ``k`` of a stream is generated from a generator seeded by
``(source.seed, seed, k)``, so any batch can be produced directly (resume, packs) and two
runs with the same seeds see identical data. The world itself (directions, frequencies,
correlation factors, hierarchy, magnitudes) is fixed by ``source.seed`` and the sizes, so it is
the same on every host.

Two worlds (``source.world``):

* ``toy``: each feature independently active with probability ``sparsity``, magnitude uniform
  in [min, max]. Easy: no structure for an SAE to get wrong.
* ``realistic`` (after SynthSAEBench's design):

  - **frequencies**: feature i (in a random order) fires with probability proportional to
    ``(rank + 10)^-zipf_exponent``, scaled to a mean of ``sparsity`` and capped at
    ``max_frequency``: a few common features, a long tail of rare ones;
  - **correlation**: whether a feature fires is a Gaussian copula: a drive
    ``sqrt(c) * (w_i . z) + sqrt(1 - c) * e_i`` with ``z`` of dimension ``correlation_rank``
    shared by all features of a token, and the feature fires when its drive is below the
    quantile that gives its frequency (so correlations change co-occurrence, not frequencies);
  - **hierarchy**: the ``hierarchy_parents`` (default ``n_features // 16``) most frequent features each own
    ``children_per_parent`` children; with an active parent, one child (chosen by the children's
    own frequency weights) fires with probability ``child_probability``, and a child never fires
    without its parent. Feature absorption (a parent's latent silent where a child's fires) can
    happen here;
  - **magnitudes**: feature i's mean magnitude is uniform in [min, max]; per token it varies by
    a log-normal factor of spread ``magnitude_std``;
  - **superposition**: ``n_features / d_in`` random unit directions; plus optional noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from saesweep.config.experiment import SyntheticSource
from saesweep.data.base import Activations, norm_scale

_EVAL_STREAM = 2**31 - 1  # the held-out stream's seed; training seeds are smaller
#: offset of the ground-truth dictionary's generator seed: a dictionary drawn with the bare
#: ``seed`` would equal the decoder initialisation of an SAE trained with the same seed (both
#: are rows of ``randn(., d)``), so every feature would count as "recovered" before training.
_DICTIONARY_STREAM = 0x5EED_D1C7
_WORLD_STREAM = 0x0A11_CE5E  # the realistic world's frequencies, correlations, hierarchy, magnitudes
_ZIPF_OFFSET = 10.0
_PROBES: dict[tuple[str, int], float] = {}  # probe ceiling per world (and held-out size), per process


@dataclass
class World:
    """The parts of a realistic world that are fixed by its seed."""

    frequency: Tensor  # [F] marginal firing probability of each feature
    threshold: Tensor  # [F] drive quantile below which a (non-child) feature fires
    factors: Tensor  # [F, r] unit correlation loadings (zeros for children)
    mean_magnitude: Tensor  # [F]
    parents: Tensor  # [P] feature ids
    children: Tensor  # [P, C] feature ids of each parent's children
    child_weights: Tensor  # [P, C] probability of each child given that one fires

    @property
    def hierarchy(self) -> list[tuple[int, list[int]]]:
        return [(int(p), [int(c) for c in cs]) for p, cs in zip(self.parents, self.children)]


def make_world(cfg: SyntheticSource) -> World:
    F = cfg.n_features
    g = torch.Generator().manual_seed(cfg.seed + _WORLD_STREAM)
    order = torch.randperm(F, generator=g)  # feature order[r] has frequency rank r
    ranks = torch.empty(F, dtype=torch.long)
    ranks[order] = torch.arange(F)
    weight = (ranks.double() + _ZIPF_OFFSET).pow(-cfg.zipf_exponent)
    freq = _scaled(weight, cfg.sparsity * F, cfg.max_frequency)
    P, C = cfg.parents, cfg.children_per_parent
    parents = order[:P]
    rest = order[P:]
    children = rest[torch.randperm(len(rest), generator=g)[: P * C]].reshape(P, C)
    child_w = freq[children] / freq[children].sum(-1, keepdim=True)
    # a child fires only with its parent: its frequency follows from the parent's
    freq = freq.clone()
    if P:
        freq[children.reshape(-1)] = (freq[parents].unsqueeze(-1) * cfg.child_probability * child_w).reshape(-1)
    threshold = torch.special.ndtri(freq.clamp(1e-12, 1 - 1e-12))
    r = cfg.correlation_rank
    factors = torch.randn(F, max(r, 1), generator=g, dtype=torch.float64)
    factors = factors / factors.norm(dim=-1, keepdim=True)
    if r == 0:
        factors.zero_()
    if P:
        factors[children.reshape(-1)] = 0.0
    mags = cfg.min_magnitude + (cfg.max_magnitude - cfg.min_magnitude) * torch.rand(F, generator=g, dtype=torch.float64)
    return World(freq.float(), threshold.float(), factors.float(), mags.float(), parents, children, child_w.float())


def _scaled(weight: Tensor, total: float, cap: float) -> Tensor:
    """``weight`` scaled to sum to ``total`` with no entry above ``cap`` (the excess spread over
    the others, in proportion)."""
    p = weight * (total / weight.sum())
    for _ in range(64):
        over = p > cap
        if not over.any():
            break
        free = total - cap * over.sum()
        p = torch.where(over, torch.full_like(p, cap), p * (free / p[~over].sum()))
    return p.clamp(max=cap)


class SyntheticActivations(Activations):
    def __init__(self, cfg: SyntheticSource, eval_tokens: int, norm_sample: int = 32_768) -> None:
        self.cfg = cfg
        self.d_in = cfg.d_in
        g = torch.Generator().manual_seed(cfg.seed + _DICTIONARY_STREAM)
        dirs = torch.randn(cfg.n_features, cfg.d_in, generator=g)
        self.ground_truth = dirs / dirs.norm(dim=-1, keepdim=True)
        self.world: Optional[World] = make_world(cfg) if cfg.world == "realistic" else None
        self._loadings: Optional[Tensor] = None
        self.eval_tokens = eval_tokens
        self._eval: Optional[tuple[Tensor, Tensor]] = None
        self.scale = 1.0
        sample = self._raw(norm_sample, _EVAL_STREAM - 1, 0)
        self.scale = norm_scale(sample)
        self._mean = (sample * self.scale).mean(0)

    def codes(self, n: int, seed: int, k: int) -> Tensor:
        """True feature magnitudes ``[n, n_features]`` of batch ``k`` of stream ``seed`` (0: inactive)."""
        return self._codes(n, seed, k)[0]

    def _codes(self, n: int, seed: int, k: int) -> tuple[Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(hash((self.cfg.seed, seed, k)) & 0x7FFF_FFFF_FFFF_FFFF)
        return self._draw(n, g), g

    def _draw(self, n: int, g: torch.Generator) -> Tensor:
        if self.world is None:
            r = torch.rand(n, self.cfg.n_features, generator=g)
            p = self.cfg.sparsity
            # active with probability p; given active, r / p ~ U(0, 1) -> magnitude in [lo, hi]
            lo, hi = self.cfg.min_magnitude, self.cfg.max_magnitude
            return torch.where(r < p, lo + (hi - lo) * (r / p), torch.zeros(()))
        w, c = self.world, self.cfg.correlation_scale
        F = self.cfg.n_features
        drive = torch.randn(n, F, generator=g)
        if self.cfg.correlation_rank:
            z = torch.randn(n, w.factors.shape[1], generator=g)
            if self._loadings is None:
                self._loadings = (math.sqrt(c) * w.factors.T).contiguous()
            drive.mul_(math.sqrt(1 - c)).addmm_(z, self._loadings)
        active = drive < w.threshold
        if len(w.parents):
            active[:, w.children.reshape(-1)] = False
            on = active[:, w.parents]  # [n, P]
            fire = on & (torch.rand(on.shape, generator=g) < self.cfg.child_probability)
            pick = torch.multinomial(w.child_weights, n, replacement=True, generator=g).T  # [n, P]
            child = w.children.gather(1, pick.T).T  # [n, P] the chosen child of each parent
            rows = torch.arange(n).unsqueeze(1).expand_as(child)
            active[rows[fire], child[fire]] = True
        rows, cols = active.nonzero(as_tuple=True)
        sd = self.cfg.magnitude_std
        out = torch.zeros(n, F)
        out[rows, cols] = w.mean_magnitude[cols] * torch.exp(sd * torch.randn(len(rows), generator=g) - sd * sd / 2)
        return out

    def _raw(self, n: int, seed: int, k: int) -> Tensor:
        return self._raw_and_codes(n, seed, k)[0]

    def _raw_and_codes(self, n: int, seed: int, k: int) -> tuple[Tensor, Tensor]:
        codes, g = self._codes(n, seed, k)
        x = codes @ self.ground_truth
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(n, self.d_in, generator=g)
        return x, codes

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        k = start
        while True:
            yield self._raw(batch_size, seed, k) * self.scale
            k += 1

    def _held_out(self) -> tuple[Tensor, Tensor]:
        """The held-out activations and which features are active on them, generated once."""
        if self._eval is None:
            x, codes = self._raw_and_codes(self.eval_tokens, _EVAL_STREAM, 0)
            self._eval = (x * self.scale, codes > 0)
        return self._eval

    def eval_activations(self) -> Tensor:
        return self._held_out()[0]

    def eval_truth(self) -> Tensor:
        """Which true features are active on each held-out token ``[N, n_features]`` (bool),
        aligned with :meth:`eval_activations`."""
        return self._held_out()[1]

    def probe_f1(self, n_train: int = 32_768) -> float:
        """The world's supervised ceiling (:func:`saesweep.metrics.recovery.probe_f1`): logistic
        probes trained on ``n_train`` labelled tokens of a stream of their own, scored on the
        held-out tokens. Computed once per world and process."""
        from saesweep.metrics.recovery import probe_f1

        key = (self.cfg.model_dump_json(), self.eval_tokens)
        if key not in _PROBES:
            codes = self.codes(n_train, _EVAL_STREAM - 2, 0)
            x = (codes @ self.ground_truth) * self.scale
            _PROBES[key] = probe_f1(x, codes > 0, self.eval_activations(), self.eval_truth())
        return _PROBES[key]

    @property
    def hierarchy(self) -> list[tuple[int, list[int]]]:
        """``(parent, children)`` feature ids of the world's hierarchies (none in the toy world)."""
        return self.world.hierarchy if self.world is not None else []

    def mean(self) -> Tensor:
        return self._mean

    def describe(self) -> dict:
        return {**super().describe(), "kind": "synthetic", "world": self.cfg.world, "n_features": self.cfg.n_features,
                "true_l0": self.true_l0}

    @property
    def true_l0(self) -> float:
        """The expected number of active true features per token."""
        return float(self.world.frequency.sum()) if self.world is not None else self.cfg.true_l0
