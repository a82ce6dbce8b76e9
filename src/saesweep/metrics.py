"""Evaluation of trained SAEs on held-out activations (DESIGN.md, "Metrics every trial reports").

Reconstruction metrics are computed on normalised activations (E||x||^2 = d), with
evaluation-mode codes (deterministic hard-concrete gates):

* ``mse``: mean over tokens and dimensions of (x - x_hat)^2;
* ``fvu``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, pooled over the evaluation set;
  ``explained_variance`` = 1 - fvu;
* ``l0``: mean number of non-zero codes per token; ``l1``: mean sum of |f| per token;
* ``dead_fraction``: features that never fire over the evaluation window.

For a language-model source the spliced metrics (``ce_clean``, ``ce_sae``, ``ce_zero``,
``ce_recovered``, ``kl``) come from the source; for a synthetic source ``mmcs`` (mean over
true features of the best cosine with a decoder row) and ``frac_recovered`` (share of true
features whose best cosine exceeds 0.9).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .activations.base import Activations
from .saes import PackedSAE

RECOVERED_COSINE = 0.9


@torch.no_grad()
def reconstruction_metrics(sae: PackedSAE, x_eval: Tensor, batch_size: int = 4096) -> list[dict[str, float]]:
    n, dev = sae.n, sae.device_
    sse = torch.zeros(n, dtype=torch.float64, device=dev)
    l1 = torch.zeros(n, dtype=torch.float64, device=dev)
    nnz = torch.zeros(n, dtype=torch.float64, device=dev)
    fired = torch.zeros(n, sae.d_sae, dtype=torch.bool, device=dev)
    sum_x = torch.zeros(x_eval.shape[1], dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for start in range(0, x_eval.shape[0], batch_size):
        x = x_eval[start : start + batch_size].to(dev, torch.float32)
        f = sae.encode(x, train=False)
        x_hat = sae.decode(f)
        sse += (x_hat - x).double().pow(2).sum(dim=(1, 2))
        l1 += f.abs().double().sum(dim=(1, 2))
        active = f != 0
        nnz += active.double().sum(dim=(1, 2))
        fired |= active.any(dim=1)
        sum_x += x.double().sum(0)
        sum_sq += x.double().pow(2).sum()
    N, d = x_eval.shape
    sst = sum_sq - sum_x.pow(2).sum() / N
    out = []
    for i in range(n):
        fvu = float(sse[i] / sst) if sst > 0 else math.nan
        out.append(
            {
                "mse": float(sse[i] / (N * d)),
                "fvu": fvu,
                "explained_variance": 1.0 - fvu,
                "l0": float(nnz[i] / N),
                "l1": float(l1[i] / N),
                "dead_fraction": float(1.0 - fired[i].float().mean()),
            }
        )
    return out


@torch.no_grad()
def dictionary_recovery(sae: PackedSAE, ground_truth: Tensor) -> list[dict[str, float]]:
    """mmcs and frac_recovered of each member's decoder rows against unit true directions."""
    out = []
    gt = ground_truth.to(sae.device_, torch.float32)
    gt = gt / gt.norm(dim=-1, keepdim=True)
    for i in range(sae.n):
        dec = sae.W_dec[i].float()
        dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best = (gt @ dec.T).max(dim=1).values  # [n_true]
        out.append({"mmcs": float(best.mean()), "frac_recovered": float((best > RECOVERED_COSINE).float().mean())})
    return out


def raw_reconstructor(sae: PackedSAE, scale: float) -> Callable[[Tensor], Tensor]:
    """A one-member SAE as a function of raw activations: normalise, encode, decode, de-normalise."""

    @torch.no_grad()
    def fn(x_raw: Tensor) -> Tensor:
        shape, dtype = x_raw.shape, x_raw.dtype
        x = x_raw.reshape(-1, shape[-1]).to(sae.device_, torch.float32) * scale
        x_hat = sae.decode(sae.encode(x, train=False))[0]
        return (x_hat / scale).reshape(shape).to(x_raw.device, dtype)

    return fn


def evaluate(sae: PackedSAE, data: Activations, batch_size: int = 4096, *, downstream: bool = True) -> list[dict[str, float]]:
    """Every metric for every member of ``sae`` (one dict per member, in row order)."""
    results = reconstruction_metrics(sae, data.eval_activations(), batch_size)
    if data.ground_truth is not None:
        for r, extra in zip(results, dictionary_recovery(sae, data.ground_truth)):
            r.update(extra)
    if downstream:
        recon = [raw_reconstructor(sae.member(i), data.scale) for i in range(sae.n)]
        for r, extra in zip(results, data.downstream_metrics(recon)):
            r.update(extra)
    return results


def first_nonfinite(metrics: dict[str, float]) -> Optional[str]:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            return k
    return None
