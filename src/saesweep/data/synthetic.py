"""Synthetic activations: sparse combinations of known ground-truth directions.

Nothing is stored: chunk ``c`` of a stream (``STREAM_CHUNK`` tokens) is generated from a generator
seeded by ``(source.seed, seed, c)``, so any batch can be produced directly (resume, packs) and two
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
    threshold that gives its frequency (so correlations change co-occurrence, not frequencies).
    A token's ``z`` is one of ``CONTEXTS`` points drawn once per world (its context), and the
    thresholds are set so that each feature's frequency over the contexts is exact;
  - **hierarchy**: the ``hierarchy_parents`` (default ``n_features // 16``) most frequent features each own
    ``children_per_parent`` children; with an active parent, one child (chosen by the children's
    own frequency weights) fires with probability ``child_probability``, and a child never fires
    without its parent. Feature absorption (a parent's latent silent where a child's fires) can
    happen here;
  - **magnitudes**: feature i's mean magnitude is uniform in [min, max]; per token it varies by
    a log-normal factor of spread ``magnitude_std``;
  - **superposition**: ``n_features / d_in`` random unit directions; plus optional noise.

Given its context a token's features are independent, so the realistic world is drawn sparsely:
the work per token follows its active features, not ``n_features``. Feature i with probability
``p`` in a context is the first arrival of a Poisson process of rate ``-log(1 - p)``; the
superposed process of all features of that context has one total rate, so a token draws its
number of arrivals (Poisson) and each arrival's feature from the context's rates (a guide table
over their cumulative sums), and repeats are dropped: each feature is then active exactly with
probability ``p``, independently of the others.
"""

from __future__ import annotations

import math
import warnings
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
#: the realistic world's correlation factor ``z`` takes one of this many points per token
CONTEXTS = 1024
#: training streams are drawn in chunks of this many tokens (batch k is a slice of them)
STREAM_CHUNK = 4096


@dataclass
class World:
    """The parts of a realistic world that are fixed by its seed."""

    frequency: Tensor  # [F] marginal firing probability of each feature
    factors: Tensor  # [F, r] unit correlation loadings (zeros for children)
    mean_magnitude: Tensor  # [F]
    parents: Tensor  # [P] feature ids
    children: Tensor  # [P, C] feature ids of each parent's children
    child_weights: Tensor  # [P, C] probability of each child given that one fires
    child_cumulative: Tensor  # [P, C] their cumulative sums
    rate: Tensor  # [K] total arrival rate of a context's features (float64)
    cumulative: Tensor  # [K, F] cumulative share of each feature in its context's rate (float64)
    guide: Tensor  # [K, F + 1] first feature whose cumulative share reaches j / F (the guide table)
    parent_slot: Tensor  # [F] a feature's row in ``parents`` (-1: not a parent)

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
    r = cfg.correlation_rank
    factors = torch.randn(F, max(r, 1), generator=g, dtype=torch.float64)
    factors = factors / factors.norm(dim=-1, keepdim=True)
    if r == 0:
        factors.zero_()
    if P:
        factors[children.reshape(-1)] = 0.0
    mags = cfg.min_magnitude + (cfg.max_magnitude - cfg.min_magnitude) * torch.rand(F, generator=g, dtype=torch.float64)
    contexts = torch.randn(CONTEXTS if r and cfg.correlation_scale > 0 else 1, max(r, 1), generator=g,
                           dtype=torch.float64)
    shared = math.sqrt(cfg.correlation_scale) * contexts @ factors.T  # [K, F]
    own = math.sqrt(1 - cfg.correlation_scale)
    threshold = _calibrated(freq.clamp(1e-12, 1 - 1e-12), shared, own)
    p = torch.special.ndtr((threshold - shared) / own).clamp(max=1 - 1e-9)
    slot = torch.full((F,), -1, dtype=torch.long)
    slot[parents] = torch.arange(P)
    if P:
        p[:, children.reshape(-1)] = 0.0  # children arrive through their parents
    rates = -torch.log1p(-p)  # [K, F]
    total = rates.sum(-1)
    cumulative = rates.cumsum(-1) / total.clamp_min(1e-300)[:, None]
    cumulative[:, -1] = 1.0
    grid = torch.arange(F + 1, dtype=torch.float64).expand(len(contexts), F + 1) / F
    guide = torch.searchsorted(cumulative, grid.contiguous()).clamp(max=F - 1)
    return World(freq.float(), factors.float(), mags.float(), parents, children, child_w.float(),
                 child_w.cumsum(-1).float(), total, cumulative, guide, slot)


def _calibrated(freq: Tensor, shared: Tensor, own: float, iters: int = 40) -> Tensor:
    """Thresholds ``t [F]`` with ``mean_k ndtr((t - shared[k]) / own) = freq``: each feature's
    frequency over the contexts exact (Newton steps from the continuous copula's quantile)."""
    t = torch.special.ndtri(freq)
    for _ in range(iters):
        u = (t - shared) / own
        err = torch.special.ndtr(u).mean(0) - freq
        slope = (torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)).mean(0) / own
        step = (err / slope.clamp_min(1e-300)).clamp(-1.0, 1.0)
        t = t - step
        if float((err.abs() / freq).max()) < 1e-9:
            break
    return t


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
        g = self._generator(seed, k)
        return self._draw(n, g), g

    def _draw(self, n: int, g: torch.Generator) -> Tensor:
        if self.world is None:
            r = torch.rand(n, self.cfg.n_features, generator=g)
            p = self.cfg.sparsity
            # active with probability p; given active, r / p ~ U(0, 1) -> magnitude in [lo, hi]
            lo, hi = self.cfg.min_magnitude, self.cfg.max_magnitude
            return torch.where(r < p, lo + (hi - lo) * (r / p), torch.zeros(()))
        out = torch.zeros(n, self.cfg.n_features)
        for rows, cols, values in self._events(n, g):
            out[rows, cols] = values
        return out

    def _events(self, n: int, g: torch.Generator) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The realistic world's active features on ``n`` tokens as groups of (token, feature,
        magnitude), each sorted by token: the features drawn from the contexts, then the children
        of the active parents (see the module's notes on the sparse draw)."""
        w, F = self.world, self.cfg.n_features
        assert w is not None
        ctx = torch.randint(len(w.rate), (n,), generator=g)
        arrivals = torch.poisson(w.rate.index_select(0, ctx), generator=g).long()
        tok = torch.repeat_interleave(torch.arange(n), arrivals)
        k = ctx.index_select(0, tok)
        u = torch.rand(len(tok), generator=g, dtype=torch.float64)
        # the first feature whose cumulative share reaches u lies between the guide's entries for
        # u's bucket and the next one: a binary search over that range, all arrivals at once
        at = k * (F + 1) + (u * F).long().clamp(max=F - 1)
        guide = w.guide.view(-1)
        lo, hi = guide.index_select(0, at), guide.index_select(0, at + 1)
        cum = w.cumulative.view(-1)
        open_ = (hi > lo).nonzero(as_tuple=True)[0]  # most buckets hold one feature: no search
        a, b, base, v = lo[open_], hi[open_], (k * F).index_select(0, open_), u.index_select(0, open_)
        for _ in range(int((b - a).max()).bit_length() if len(a) else 0):
            mid = (a + b) >> 1
            right = cum.index_select(0, base + mid) < v
            a = torch.where(right, mid + 1, a)
            b = torch.where(right, b, mid)
        lo[open_] = a
        key = torch.unique(tok * F + lo)
        groups = [(key // F, key % F)]
        if len(w.parents):
            rows, cols = groups[0]
            slot = w.parent_slot.index_select(0, cols)
            on = (slot >= 0).nonzero(as_tuple=True)[0]
            fire = on[torch.rand(len(on), generator=g) < self.cfg.child_probability]
            s = slot.index_select(0, fire)
            # each firing parent's one child, by the children's weights
            below = torch.rand(len(fire), 1, generator=g) > w.child_cumulative.index_select(0, s)
            pick = below.sum(-1).clamp(max=w.children.shape[1] - 1)
            groups.append((rows.index_select(0, fire), w.children.view(-1).index_select(0, s * w.children.shape[1] + pick)))
        sd = self.cfg.magnitude_std
        out = []
        for rows, cols in groups:
            spread = torch.exp(sd * torch.randn(len(cols), generator=g) - sd * sd / 2)
            out.append((rows, cols, w.mean_magnitude.index_select(0, cols) * spread))
        return out

    def _generator(self, seed: int, k: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.seed, seed, k)) & 0x7FFF_FFFF_FFFF_FFFF)

    def _raw(self, n: int, seed: int, k: int) -> Tensor:
        if self.world is None:
            return self._raw_and_codes(n, seed, k)[0]
        g = self._generator(seed, k)
        return self._noisy(self._activations(n, self._events(n, g)), g)

    def _activations(self, n: int, groups: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """``codes @ ground_truth`` from the codes' (token, feature, magnitude) groups."""
        x = torch.zeros(n, self.d_in)
        for rows, cols, values in groups:
            crow = torch.zeros(n + 1, dtype=torch.long)
            crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
            with warnings.catch_warnings():  # torch calls sparse CSR support beta
                warnings.simplefilter("ignore")
                x += torch.sparse_csr_tensor(crow, cols, values, (n, self.cfg.n_features)) @ self.ground_truth
        return x

    def _raw_and_codes(self, n: int, seed: int, k: int) -> tuple[Tensor, Tensor]:
        codes, g = self._codes(n, seed, k)
        return self._noisy(codes @ self.ground_truth, g), codes

    def _noisy(self, x: Tensor, g: torch.Generator) -> Tensor:
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(x.shape[0], self.d_in, generator=g)
        return x

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        """Stream ``seed`` from batch ``start`` on. The stream is made of chunks of ``STREAM_CHUNK``
        tokens, chunk ``c`` drawn from its own generator, so batch ``k`` is tokens
        ``[k * batch_size, (k + 1) * batch_size)`` of it whatever came before."""
        pos = start * batch_size
        c, chunk = -1, torch.empty(0, self.d_in)
        while True:
            parts, need = [], batch_size
            while need:
                if pos // STREAM_CHUNK != c:
                    c = pos // STREAM_CHUNK
                    chunk = self._raw(STREAM_CHUNK, seed, c) * self.scale
                at = pos - c * STREAM_CHUNK
                part = chunk[at:at + need]
                parts.append(part)
                pos += len(part)
                need -= len(part)
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    def _held_out(self) -> tuple[Tensor, Tensor]:
        """The held-out activations and which features are active on them, generated once."""
        if self._eval is None:
            n = self.eval_tokens
            if self.world is None:
                x, codes = self._raw_and_codes(n, _EVAL_STREAM, 0)
                self._eval = (x * self.scale, codes > 0)
            else:  # no dense codes: the truth is n x n_features booleans, a quarter of their floats
                g = self._generator(_EVAL_STREAM, 0)
                groups = self._events(n, g)
                truth = torch.zeros(n, self.cfg.n_features, dtype=torch.bool)
                for rows, cols, _ in groups:
                    truth[rows, cols] = True
                self._eval = (self._noisy(self._activations(n, groups), g) * self.scale, truth)
        return self._eval

    def eval_activations(self) -> Tensor:
        return self._held_out()[0]

    def eval_codes(self, features: Optional[Tensor] = None) -> Tensor:
        """The true magnitudes of ``features`` (default: all) on the held-out tokens ``[N, len]``
        (raw scale, before normalisation), aligned with :meth:`eval_activations`; drawn again on
        each call."""
        n = self.eval_tokens
        if self.world is None:
            codes = self._raw_and_codes(n, _EVAL_STREAM, 0)[1]
            return codes if features is None else codes[:, features]
        features = torch.arange(self.cfg.n_features) if features is None else features
        column = torch.full((self.cfg.n_features,), -1, dtype=torch.long)
        column[features] = torch.arange(len(features))
        out = torch.zeros(n, len(features))
        for rows, cols, values in self._events(n, self._generator(_EVAL_STREAM, 0)):
            keep = column[cols] >= 0
            out[rows[keep], column[cols[keep]]] = values[keep]
        return out

    def feature_frequency(self) -> Tensor:
        """Each true feature's firing probability ``[n_features]``."""
        if self.world is not None:
            return self.world.frequency
        return torch.full((self.cfg.n_features,), self.cfg.sparsity)

    def eval_truth(self) -> Tensor:
        """Which true features are active on each held-out token ``[N, n_features]`` (bool),
        aligned with :meth:`eval_activations`."""
        return self._held_out()[1]

    def probe_training_set(self, n_train: int = 32_768) -> tuple[Tensor, Tensor]:
        """``(activations [n_train, d_in], which true features are active [n_train, n_features])``
        from a stream of their own, for the supervised probe that is the world's ceiling
        (:func:`saesweep.metrics.recovery.world_probe_f1`)."""
        codes = self.codes(n_train, _EVAL_STREAM - 2, 0)
        return (codes @ self.ground_truth) * self.scale, codes > 0

    @property
    def world_key(self) -> tuple[str, int]:
        """What fixes this world and its held-out set (a key for results computed once per world)."""
        return self.cfg.model_dump_json(), self.eval_tokens

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


def dense_active(data: SyntheticActivations, n: int, g: torch.Generator) -> Tensor:
    """Which features of ``data``'s realistic world fire on ``n`` tokens ``[n, n_features]``, drawn
    the simple way: every feature's drive for every token with a continuous ``z``, the thresholds
    at the frequencies' normal quantiles. The model the sparse draw samples; for tests and
    benchmarks."""
    w, cfg = data.world, data.cfg
    if w is None:
        raise ValueError("dense_active: the toy world has no copula")
    c = cfg.correlation_scale
    z = torch.randn(n, w.factors.shape[1], generator=g)
    drive = math.sqrt(1 - c) * torch.randn(n, cfg.n_features, generator=g) + math.sqrt(c) * z @ w.factors.T
    active = drive < torch.special.ndtri(w.frequency.clamp(1e-12, 1 - 1e-12))
    if len(w.parents):
        active[:, w.children.reshape(-1)] = False
        on = active[:, w.parents]
        fire = on & (torch.rand(on.shape, generator=g) < cfg.child_probability)
        pick = torch.multinomial(w.child_weights, n, replacement=True, generator=g).T
        child = w.children.gather(1, pick.T).T
        rows = torch.arange(n).unsqueeze(1).expand_as(child)
        active[rows[fire], child[fire]] = True
    return active
