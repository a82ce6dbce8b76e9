"""Random baselines: what the metrics of a dictionary that learned nothing are, so a sweep can
tell when its SAEs beat chance.

Each baseline is a width-``m`` dictionary that keeps ``k`` latents per token (``k`` = the L0 it
is compared at), scored with the metrics every trial gets (FVU, L0, the recovery metrics on a
synthetic source, the spliced CE/KL on a language-model source):

* ``random_decoder``: random unit decoder rows, held fixed; a ReLU encoder with a top-k is
  trained for a few hundred steps to reconstruct through them (the decoder learned nothing,
  the encoder did its best).
* ``random_firing``: each token fires ``k`` latents drawn at random, coding the token's
  projections on their random directions, scaled together to fit it best (a firing pattern that
  carries no information).
* ``pca``: the principal directions of the activations as the dictionary (at most ``d`` of
  them), each token coded by its ``k`` largest-magnitude components (the best linear
  dictionary of that L0 without sparse structure).

On a synthetic source two references from above join them, both width ``m`` like the SAEs they
are set beside (the ``m`` most frequent true features, or all of them where ``m`` is wider), so
their recovery metrics average over the same number of latents:

* ``true_dictionary``: those true directions as the decoder, with a top-k encoder trained to
  reconstruct through them: what an SAE that found them reaches with a top-k code (a
  reference, not a bound: its encoder trains for only a few hundred steps).
* ``oracle``: the same directions, each latent firing exactly where its feature is active with
  the feature's true magnitude (the true support; its L0 is the world's over those features,
  not ``k``): the best recovery scores a width-``m`` dictionary can have (not the best FVU:
  a trained code also projects the features its directions leave out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from saesweep.data.base import Activations
from saesweep.metrics.downstream import downstream_metrics
from saesweep.metric_registry import BASELINES

KINDS = BASELINES
#: the baselines that need a source's true features
TRUTH_KINDS = ("true_dictionary", "oracle")
FILE = "baselines.json"


class Baseline:
    """A fixed dictionary ``W_dec [m, d]`` with a way to choose each token's ``k`` codes."""

    def __init__(self, kind: str, W_dec: Tensor, b_dec: Tensor, k: int, W_enc: Optional[Tensor] = None,
                 b_enc: Optional[Tensor] = None, seed: int = 0, eval_codes: Optional[Tensor] = None) -> None:
        self.kind, self.W_dec, self.b_dec, self.k = kind, W_dec, b_dec, k
        self.W_enc, self.b_enc = W_enc, b_enc
        #: the oracle's codes on the held-out tokens (it reads the truth, not the activations)
        self.eval_codes = eval_codes
        self._g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Codes ``[N, m]`` of normalised activations ``x [N, d]`` (zero where a latent does not fire)."""
        if self.eval_codes is not None:
            raise ValueError("the oracle codes the held-out tokens from the truth, not from activations")
        if self.W_enc is not None:  # a trained encoder
            return _topk(torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc), self.k)
        proj = (x - self.b_dec) @ self.W_dec.T  # [N, m]
        if self.kind == "pca":
            return _topk(proj, self.k, by_magnitude=True)
        keep = torch.rand(proj.shape, generator=self._g).topk(self.k, dim=-1).indices
        codes = torch.zeros_like(proj).scatter_(-1, keep, proj.gather(-1, keep))
        # scaled per token to the least-squares multiple of its reconstruction (random directions overlap)
        x_hat = codes @ self.W_dec
        gain = (x_hat * (x - self.b_dec)).sum(-1, keepdim=True) / x_hat.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        return codes * gain

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec


def _topk(v: Tensor, k: int, *, by_magnitude: bool = False) -> Tensor:
    idx = (v.abs() if by_magnitude else v).topk(min(k, v.shape[-1]), dim=-1).indices
    return torch.zeros_like(v).scatter_(-1, idx, v.gather(-1, idx))


def _unit_rows(n: int, d: int, g: torch.Generator) -> Tensor:
    w = torch.randn(n, d, generator=g)
    return w / w.norm(dim=-1, keepdim=True)


#: the most bytes of training batches kept in memory for the baselines' encoders to share
POOL_BYTES = 2**28


class BatchPool:
    """The training batches of one stream, generated once and shared by every baseline that
    trains on it (they all read the same stream from its start), up to :data:`POOL_BYTES`;
    past that each reader generates its own from where the pool ends."""

    def __init__(self, data: Activations, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.kept: list[Tensor] = []
        self._source: Optional[Iterator[Tensor]] = None
        self._full = False

    def __iter__(self) -> Iterator[Tensor]:
        i = 0
        while True:
            if i < len(self.kept):
                yield self.kept[i]
            elif not self._full:
                if self._source is None:
                    self._source = self.data.train_batches(self.batch_size, self.seed, start=len(self.kept))
                b = next(self._source)
                if (len(self.kept) + 1) * b.numel() * b.element_size() > POOL_BYTES:
                    self._full, self._source = True, None
                    yield b
                else:
                    self.kept.append(b)
                    yield b
            else:
                yield from self.data.train_batches(self.batch_size, self.seed, start=i)
                return
            i += 1


def build(kind: str, data: Activations, d_sae: int, l0: float, *, seed: int = 0, steps: int = 300,
          batch_size: int = 1024, lr: float = 3e-3, pool: Optional[BatchPool] = None) -> Baseline:
    """The baseline ``kind`` (:data:`KINDS`) of width ``d_sae`` at L0 ``l0`` on ``data``
    (``pool``: the training batches, shared with other baselines of the same ``seed``)."""
    if kind not in KINDS:
        raise ValueError(f"baseline {kind!r}: choose from {', '.join(KINDS)}")
    k = max(1, round(l0))
    g = torch.Generator().manual_seed(seed + 0xBA5E)
    d = data.d_in
    b_dec = data.mean().float().cpu()
    if kind in ("true_dictionary", "oracle"):
        if data.ground_truth is None or not hasattr(data, "feature_frequency"):
            raise ValueError(f"baseline {kind!r}: the source has no known true features")
        chosen = data.feature_frequency().argsort(descending=True, stable=True)[:d_sae].sort().values
        W_dec = data.ground_truth.float().cpu()[chosen]
        norm = W_dec.norm(dim=-1, keepdim=True)
        if kind == "oracle":  # true magnitudes on the true support; the mean is part of the truth
            return Baseline(kind, W_dec / norm, torch.zeros(d), k,
                            eval_codes=data.eval_codes(chosen) * norm.T * data.scale)
        return _train_encoder(kind, data, W_dec / norm, b_dec, k, seed, 3 * steps, batch_size, lr, pool)
    if kind == "pca":
        x = next(data.train_batches(max(batch_size, 4 * d), seed + 0xBA5E)).float().cpu() - b_dec
        _, _, vt = torch.linalg.svd(x, full_matrices=False)  # rows: principal directions
        return Baseline(kind, vt[: min(d_sae, d)].contiguous(), b_dec, k)
    W_dec = _unit_rows(d_sae, d, g)
    if kind == "random_firing":
        return Baseline(kind, W_dec, b_dec, k, seed=seed)
    return _train_encoder(kind, data, W_dec, b_dec, k, seed, steps, batch_size, lr, pool)


def _train_encoder(kind: str, data: Activations, W_dec: Tensor, b_dec: Tensor, k: int, seed: int, steps: int,
                   batch_size: int, lr: float, pool: Optional[BatchPool] = None) -> Baseline:
    """A ReLU top-k encoder trained (Adam, MSE) to reconstruct through the fixed decoder ``W_dec``."""
    W_enc = (W_dec.T.clone() * 0.5).requires_grad_()
    b_enc = torch.zeros(W_dec.shape[0], requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc], lr=lr)
    if pool is None or pool.batch_size != batch_size or pool.seed != seed + 0xBA5E:
        pool = BatchPool(data, batch_size, seed + 0xBA5E)
    batches = iter(pool)
    for _ in range(steps):
        x = next(batches).float().cpu()
        codes = _topk(torch.relu((x - b_dec) @ W_enc + b_enc), k)
        loss = (codes @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Baseline(kind, W_dec, b_dec, k, W_enc.detach(), b_enc.detach())


@torch.no_grad()
def score(b: Baseline, data: Activations, batch_size: int = 4096, *, downstream: bool = True) -> dict[str, float]:
    """The trial metrics that apply to a fixed dictionary: FVU, L0, dead features, and the
    recovery (synthetic) or spliced (LM) metrics of the source."""
    x = data.eval_activations().float().cpu()
    if b.eval_codes is not None:
        codes, downstream = b.eval_codes, False
    else:
        codes = torch.cat([b.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    x_hat = b.decode(codes)
    x64 = x.double()
    sst = float(x64.pow(2).sum() - x64.sum(0).pow(2).sum() / len(x))
    fvu = float((x_hat - x).double().pow(2).sum()) / sst if sst > 0 else math.nan
    fires = codes != 0
    row = {"fvu": fvu, "explained_variance": 1 - fvu, "l0": float(fires.sum(-1).double().mean()),
           "dead_fraction": float((~fires.any(0)).double().mean()), "d_sae": float(codes.shape[1])}
    if data.ground_truth is not None and hasattr(data, "eval_truth"):
        from saesweep.metrics.recovery import recovery_metrics

        row.update(recovery_metrics([fires], data.eval_truth(), [b.W_dec], data.ground_truth, data.hierarchy)[0])
    if downstream:
        scale = data.scale

        def recon(x_raw: Tensor) -> Tensor:
            shape, dtype = x_raw.shape, x_raw.dtype
            xs = x_raw.reshape(-1, shape[-1]).float().cpu() * scale
            return (b.decode(b.encode(xs)) / scale).reshape(shape).to(x_raw.device, dtype)

        row.update(downstream_metrics(data, [recon])[0])
    return row


def baselines(data: Activations, d_sae: int, l0s: Sequence[float], kinds: Sequence[str] = tuple(KINDS), *,
              seed: int = 0, steps: int = 300, downstream: bool = True, done: Sequence[dict] = (),
              on_row: Optional[Callable[[dict, int, int, float], None]] = None) -> list[dict]:
    """One row per (kind, L0), the oracle's only at the first L0: ``{"baseline", "target_l0", **metrics}`` (``true_dictionary``
    only where the source knows its true features). Rows of ``done`` with the same kind and L0
    are kept instead of computed again; ``on_row(row, i, n, seconds)`` is told of each new one."""
    import time

    kinds = [k for k in kinds if k not in TRUTH_KINDS or data.ground_truth is not None]
    have = {(r.get("baseline"), float(r.get("target_l0", -1))): r for r in done}
    # the oracle's codes are the truth's whatever the L0: one row, at the first L0
    todo = [(float(l0), kind) for i, l0 in enumerate(l0s) for kind in kinds if kind != "oracle" or i == 0]
    pool = BatchPool(data, 1024, seed + 0xBA5E)
    rows = []
    for i, (l0, kind) in enumerate(todo):
        row = have.get((kind, l0))
        if row is None:
            t0 = time.perf_counter()
            b = build(kind, data, d_sae, l0, seed=seed, steps=steps, pool=pool)
            row = {"baseline": kind, "target_l0": l0, **score(b, data, downstream=downstream)}
            if on_row is not None:
                on_row(row, i + 1, len(todo), time.perf_counter() - t0)
        rows.append(row)
    return rows


def default_l0s(l0s: Sequence[float], n: int = 3) -> list[int]:
    """Up to ``n`` whole L0s spread geometrically over the range of ``l0s`` (the trials')."""
    vals = sorted(v for v in l0s if math.isfinite(v) and v >= 0.5)
    if not vals:
        return []
    lo, hi = vals[0], vals[-1]
    if hi / lo < 1.5:
        return [max(1, round(math.sqrt(lo * hi)))]
    pts = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    return sorted({max(1, round(p)) for p in pts})


def write(folder: Path, rows: list[dict], meta: dict) -> Path:
    from saesweep.io import atomic_write_json

    path = Path(folder) / FILE
    atomic_write_json(path, {**meta, "rows": rows})
    return path


def _read_file(folder: Path) -> dict:
    try:
        saved = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def read(folder: Path) -> list[dict]:
    """The baseline rows saved in a sweep folder (none when there are none)."""
    return list(_read_file(folder).get("rows", []))


def lines(rows: list[dict]) -> list[str]:
    """The baselines for the end of a sweep and ``saesweep results``."""
    if not rows:
        return []
    extra = [k for k in ("feature_f1", "absorption", "ce_loss_score") if any(k in r for r in rows)]
    out = ["Random baselines (what the metrics are without learning; an SAE should beat them at its L0)"
           + (" and the true-dictionary references at the same width:" if any(
               r["baseline"] in TRUTH_KINDS for r in rows) else ":")]
    for r in rows:
        cols = [f"{KINDS.get(r['baseline'], r['baseline']):34s}", f"l0 {r['l0']:8.2f}", f"fvu {r['fvu']:.4f}"]
        cols += [f"{k} {r[k]:.3f}" for k in extra if k in r and r[k] is not None and math.isfinite(r[k])]
        out.append("  " + "  ".join(cols))
    return out


#: changes when the baselines' construction changes, so that saved rows are not reused
VERSION = 2


def for_sweep(records, folder: Path, l0s: Optional[Sequence[float]] = None, kinds: Sequence[str] = tuple(KINDS), *,
              downstream: bool = True, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """The baselines of a sweep's complete trials, saved in its folder: at the source and the
    most common width of those trials, at ``l0s`` (default: spread over the trials' L0s).

    Each row is written to the folder's :data:`FILE` as soon as it is computed, and rows saved
    there for the same source, width, seed and construction are reused, never computed again.
    ``progress(line)`` gets a line before the work and one per baseline (kind, L0, time)."""
    from collections import Counter

    from saesweep.config.experiment import read_yaml, stored_config
    from saesweep.data import open_source

    def config_file(r) -> Optional[Path]:  # where the run was written, or where the sweep folder has it now
        for run in ([Path(r.run_dir)] if r.run_dir else []) + [Path(folder) / "trials" / r.trial_id]:
            if (run / "config.yaml").exists():
                return run / "config.yaml"
        return None

    done = [r for r in records if r.state == "complete" and config_file(r)]
    if not done:
        return []
    width = Counter(int(r.metrics["d_sae"]) for r in done if r.metrics.get("d_sae")).most_common(1)
    path = config_file(done[0])
    cfg = stored_config(read_yaml(path), where=str(path))
    d_sae = width[0][0] if width else cfg.d_sae(cfg.source.d_in)
    if not l0s:  # the L0s of useful SAEs: not denser than d_in or half the width, not far sparser than the truth
        top = min(cfg.source.d_in, d_sae / 2)
        low = float(done[0].metrics.get("true_l0", 0.0) or 0.0) / 4
        seen = [float(r.metrics["l0"]) for r in done if "l0" in r.metrics]
        l0s = default_l0s([v for v in seen if low <= v <= top]) or default_l0s([min(max(v, 1.0), top) for v in seen])
    if not l0s:
        return []
    meta = {"d_sae": d_sae, "source": cfg.source.model_dump(mode="json"), "seed": cfg.train.seed,
            "eval_tokens": cfg.eval.tokens, "downstream": downstream, "version": VERSION}
    saved = _read_file(folder)
    done = saved.get("rows", []) if {k: saved.get(k) for k in meta} == meta else []
    wanted = {(k, float(v)) for v in l0s for k in kinds}
    if wanted <= {(r.get("baseline"), float(r.get("target_l0", -1))) for r in done}:
        return [r for r in done if (r.get("baseline"), float(r.get("target_l0", -1))) in wanted]
    new_rows: list[dict] = []
    if progress is not None:
        progress(f"Baselines at L0 {', '.join(f'{v:g}' for v in l0s)} (width {d_sae}): {', '.join(kinds)}")

    def on_row(row: dict, i: int, n: int, seconds: float) -> None:
        new_rows.append(row)
        write(folder, [*done, *new_rows], meta)  # each result is kept as soon as it exists
        if progress is not None:
            extra = "".join(f", {k} {row[k]:.3f}" for k in ("feature_f1", "ce_loss_score") if _finite(row.get(k)))
            progress(f"  [{i}/{n}] {row['baseline']} at L0 {row['target_l0']:g}: l0 {row['l0']:.2f}, "
                     f"fvu {row['fvu']:.4f}{extra}  ({seconds:.1f}s)")

    data = open_source(cfg)
    try:
        rows = baselines(data, d_sae, l0s, kinds, seed=cfg.train.seed, downstream=downstream, done=done,
                         on_row=on_row)
    finally:
        data.close()
    keep = {(r["baseline"], float(r["target_l0"])) for r in rows}
    write(folder, rows + [r for r in done if (r.get("baseline"), float(r.get("target_l0", -1))) not in keep], meta)
    return rows


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
