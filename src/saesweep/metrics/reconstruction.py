"""Evaluation of trained SAEs on held-out activations (the metrics every trial reports).

Reconstruction metrics are computed on the normalised activations the SAE was trained on
(E||x||^2 = 1, see :data:`saesweep.saes.base.LOSS_CONVENTION`), with evaluation-mode codes
(deterministic hard-concrete gates). Names and definitions follow SAEBench core / SAELens
``evals`` where they have one:

* ``fvu``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, pooled over the evaluation set;
  ``explained_variance`` = 1 - fvu (SAELens's current, pooled definition);
* ``mse``: mean over tokens and dimensions of (x - x_hat)^2 on the normalised activations
  (saesweep's; SAELens's ``mse`` is the per-token sum on raw activations);
* ``cossim``: mean over tokens of cos(x, x_hat); ``l2_ratio``: mean over tokens of
  ||x_hat|| / ||x|| (scale-free, so equal on raw activations);
* ``l0``: mean number of non-zero codes per token; ``l1``: mean sum of |f| per token;
* ``dead_fraction``: features that never fire over the evaluation window;
  ``feature_density``: each feature's firing frequency (the report's histogram).

For a language-model source the spliced metrics (``ce_clean``, ``ce_sae``, ``ce_zero``,
``ce_loss_score``, ``kl``, ``kl_zero``, ``kl_div_score``; see
:func:`saesweep.metrics.downstream.spliced_metrics`) come from the source; for a synthetic source
the recovery of the true features (:mod:`saesweep.metrics.recovery`: ``feature_f1`` and the rest).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from saesweep.data.base import Activations
from saesweep.saes import PackedSAE
from saesweep.metrics.downstream import downstream_metrics
from saesweep.saes.kernels import plan_for



@torch.no_grad()
def reconstruction_metrics(sae: PackedSAE, x_eval: Tensor, batch_size: int = 4096) -> list[dict[str, float]]:
    """Pooled reconstruction metrics of every member on ``x_eval`` (normalised, ``[N, d]``).

    Members are evaluated one at a time on CPU, all together elsewhere, over token chunks
    sized like the training step's (:func:`~saesweep.saes.kernels.plan_for`), so the codes of
    a chunk stay in cache; memory is one ``[chunk, m]`` code tensor whatever the pack size.
    Per chunk the codes are reduced with cheap passes: after decoding, |f| in place and its
    sum (L1), then sign in place and its column sums (firing counts: L0, dead features,
    densities). Sums are accumulated in float64.
    """
    n, dev, m = sae.n, sae.device_, sae.d_sae
    plan = plan_for(dev, n, sae.d_in, m, batch_size)
    chunk = min(batch_size, plan.chunk or batch_size)
    sse, l1, cos, ratio = (torch.zeros(n, dtype=torch.float64, device=dev) for _ in range(4))
    fires = torch.zeros(n, m, dtype=torch.float64, device=dev)
    groups = [slice(i, i + 1) for i in range(n)] if plan.mode == "loop" else [slice(0, n)]
    for g in groups:
        view = sae.member(g.start) if g.stop - g.start == 1 else sae
        for start in range(0, x_eval.shape[0], chunk):
            x = x_eval[start : start + chunk].to(dev, torch.float32)
            f = view.encode(x, train=False)  # [k, t, m]
            x_hat = view.decode(f)
            sse[g] += (x_hat - x).pow(2).sum(dim=(1, 2)).double()
            x_norm, hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)  # [t], [k, t]
            cos[g] += ((x_hat * x).sum(-1) / (hat_norm * x_norm).clamp_min(1e-12)).sum(-1).double()
            ratio[g] += (hat_norm / torch.where(x_norm < 1e-4, 1.0, x_norm)).sum(-1).double()
            l1[g] += f.abs_().sum(dim=(1, 2)).double()
            f.sign_()
            fires[g] += f.sum(1).double()  # [k, m]
    nnz = fires.sum(-1)
    x64 = x_eval.to(dev, torch.float64)
    N, d = x_eval.shape
    sst = x64.pow(2).sum() - x64.sum(0).pow(2).sum() / N
    out = []
    for i in range(n):
        fvu = float(sse[i] / sst) if sst > 0 else math.nan
        out.append(
            {
                "mse": float(sse[i] / (N * d)),
                "fvu": fvu,
                "explained_variance": 1.0 - fvu,
                "cossim": float(cos[i] / N),
                "l2_ratio": float(ratio[i] / N),
                "l0": float(nnz[i] / N),
                "l1": float(l1[i] / N),
                "dead_fraction": float((fires[i] == 0).double().mean()),
                "feature_density": density_histogram(fires[i] / N),
            }
        )
    return out


#: edges of the feature-density histogram, log10 of the firing frequency
DENSITY_EDGES = [e / 2 for e in range(-14, 1)]  # 1e-7 .. 1


def density_histogram(density: Tensor) -> dict:
    """Counts of features per log10-density bin (``DENSITY_EDGES``) and of dead ones (density 0)."""
    d = density.double().cpu()
    alive = d[d > 0].log10().clamp(DENSITY_EDGES[0], DENSITY_EDGES[-1] - 1e-9)
    counts = torch.histc(alive, bins=len(DENSITY_EDGES) - 1, min=DENSITY_EDGES[0], max=DENSITY_EDGES[-1])
    return {"log10_edges": DENSITY_EDGES, "counts": [int(c) for c in counts], "dead": int((d == 0).sum())}


def raw_reconstructor(sae: PackedSAE, scale: float) -> Callable[[Tensor], Tensor]:
    """A one-member SAE as a function of raw activations: normalise, encode, decode, de-normalise."""

    @torch.no_grad()
    def fn(x_raw: Tensor) -> Tensor:
        shape, dtype = x_raw.shape, x_raw.dtype
        x = x_raw.reshape(-1, shape[-1]).to(sae.device_, torch.float32) * scale
        x_hat = sae.decode(sae.encode(x, train=False))[0]
        return (x_hat / scale).reshape(shape).to(x_raw.device, dtype)

    return fn


def evaluate(sae: PackedSAE, data: Activations, batch_size: int = 4096, *, downstream: bool = True,
             budget_s: Optional[float] = None) -> list[dict[str, float]]:
    """Every metric for every member of ``sae`` (one dict per member, in row order).
    ``budget_s`` bounds the whole evaluation's time where it can: the spliced LM metrics get what
    the reconstruction metrics left (at least one LM batch; see ``eval.ce_time_frac``)."""
    t0 = time.perf_counter()
    results = reconstruction_metrics(sae, data.eval_activations(), batch_size)
    if data.ground_truth is not None and hasattr(data, "eval_truth"):
        from saesweep.metrics.recovery import world_probe_f1, world_recovery

        for r, extra in zip(results, world_recovery(sae, data, batch_size, probe=world_probe_f1(data))):
            r.update(extra)
    if downstream:
        recon = [raw_reconstructor(sae.member(i), data.scale) for i in range(sae.n)]
        left = None if budget_s is None else max(0.0, budget_s - (time.perf_counter() - t0))
        for r, extra in zip(results, downstream_metrics(data, recon, budget_s=left)):
            r.update(extra)
    return results


def first_nonfinite(metrics: dict[str, float]) -> Optional[str]:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            return k
    return None
