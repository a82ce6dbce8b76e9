"""Downstream metrics: the language model's loss with an SAE's reconstruction spliced into the
hooked residual stream (SAEBench core's ``ce_loss_score`` and ``kl_div_score``)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from saesweep.data.base import Activations, Reconstructor
from saesweep.settings import env

if TYPE_CHECKING:
    from saesweep.data.lm import HookedLM

_LOGIT_ELEMENTS = 2**25  # bound on batch * context * vocab when computing CE/KL
FIRST_ROWS = 4  # rows of the first batch, which times the rest


def kl_sum(lp_clean: Tensor, lp: Tensor, first: int = 0, p_clean: Optional[Tensor] = None) -> float:
    """Sum over rows and positions ``first..`` of KL(p_clean || p) = sum_v p_clean (log p_clean - log p),
    from log-probabilities ``[rows, ctx, vocab]`` (``p_clean``: ``lp_clean.exp()``, when already at hand)."""
    p = lp_clean.exp() if p_clean is None else p_clean
    return (p[:, first:] * (lp_clean[:, first:] - lp[:, first:])).sum().item()


#: what the clean and zero-ablated passes give for one batch of rows (reused by later calls)
BatchBaseline = dict[str, float]


def spliced_metrics(
    lm: HookedLM,
    rows: np.ndarray,
    reconstructors: Sequence[Reconstructor],
    *,
    batch_rows: int,
    baseline: Optional[list[BatchBaseline]] = None,
    shortcut: bool = True,
    budget_s: Optional[float] = None,
    skip_first: bool = False,
) -> tuple[list[dict[str, float]], list[BatchBaseline]]:
    """SAEBench core's downstream metrics per reconstructor, in the convention of SAELens's
    ``run_evals`` (``sae_lens.evals.get_recons_loss`` with its special tokens excluded): with
    ``skip_first`` (rows that start with BOS) the reconstruction replaces every position of the
    hooked residual but the first, the zero ablation every position, and the first position's
    prediction and its KL are left out of the means; CE is the mean next-token loss over the
    predictions scored, KL(p_clean || p_edited) the mean over the positions scored (:func:`kl_sum`).

    * ``ce_clean``, ``ce_sae``, ``ce_zero``; ``ce_loss_score`` = (ce_zero - ce_sae) / (ce_zero - ce_clean);
    * ``kl`` (with the SAE), ``kl_zero`` (zero-ablated); ``kl_div_score`` = (kl_zero - kl) / kl_zero;
    * ``ce_tokens``: the predictions scored (fewer than the rows hold when ``budget_s`` stopped early).

    The clean pass runs once per batch for all reconstructors, and with ``shortcut`` the blocks
    before the hook too: each edit then runs only the blocks after it (:meth:`HookedLM.clean_and_tail`,
    which falls back to full forwards for a model where that does not reproduce the logits);
    ``shortcut=False`` is the plain path, a full forward per edit. ``baseline`` is what an
    earlier call on the same rows returned (the clean and zero-ablated figures per batch): those
    batches skip the zero-ablated pass. ``budget_s``: no new batch is started once it would end
    past this many seconds (the first batch always runs). Each reconstructor gets raw float32
    activations ``[N, d]`` on the LM's device and returns raw reconstructions of the same shape.
    """
    device = next(lm.model.parameters()).device
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or 1)
    ctx = rows.shape[1]
    batch_rows = max(1, min(batch_rows, _LOGIT_ELEMENTS // (ctx * vocab)))
    k = len(reconstructors)
    base = list(baseline or [])
    ce_sae_sum, kl_sums = [0.0] * k, [0.0] * k

    first = 1 if skip_first else 0

    def splice(f: Optional[Reconstructor]) -> Callable[[Tensor], Tensor]:
        def edit(h: Tensor) -> Tensor:
            if f is None:
                return torch.zeros_like(h)
            out = f(h.reshape(-1, h.shape[-1]).float()).reshape(h.shape).to(device=h.device, dtype=h.dtype)
            return torch.cat([h[:, :first], out[:, first:]], 1) if first else out

        return edit

    def ce_and_logprobs(logits: Tensor, targets: Tensor) -> tuple[float, Tensor]:
        lp = logits.float().log_softmax(-1)
        return -lp[:, first:-1].gather(-1, targets).sum().item(), lp

    t0 = time.perf_counter()
    used = 0
    # a small first batch times the work cheaply; then full batches (the same cuts every call)
    starts = [0, *range(min(FIRST_ROWS, batch_rows), rows.shape[0], batch_rows)]
    for b, (i, j) in enumerate(zip(starts, [*starts[1:], rows.shape[0]])):
        if i >= j:
            break
        if budget_s is not None and b and (time.perf_counter() - t0) * (1 + (j - i) / i) > budget_s:
            break
        ids = torch.from_numpy(np.ascontiguousarray(rows[i:j])).to(device)
        targets = ids[:, first + 1:].unsqueeze(-1)
        clean, tail = lm.clean_and_tail(ids) if shortcut else (lm.logits(ids), None)

        def edited(f: Optional[Reconstructor]) -> Tensor:
            if tail is None:
                return lm.logits(ids, splice(f))
            return tail(splice(f)(tail.residual))

        ce_clean, lp_clean = ce_and_logprobs(clean, targets)
        p_clean = lp_clean.exp()
        if b >= len(base):
            ce_zero, lp = ce_and_logprobs(edited(None), targets)
            base.append({"ce_clean": ce_clean, "ce_zero": ce_zero, "kl_zero": kl_sum(lp_clean, lp, first, p_clean),
                         "n_pred": targets.numel(), "n_pos": ids[:, first:].numel()})
        for j, f in enumerate(reconstructors):
            ce, lp = ce_and_logprobs(edited(f), targets)
            ce_sae_sum[j] += ce
            kl_sums[j] += kl_sum(lp_clean, lp, first, p_clean)
        used = b + 1
    sums = {key: sum(x[key] for x in base[:used]) for key in ("ce_clean", "ce_zero", "kl_zero", "n_pred", "n_pos")}
    n_pred, n_pos = max(sums["n_pred"], 1), max(sums["n_pos"], 1)
    ce_clean, ce_zero, kl_zero = sums["ce_clean"] / n_pred, sums["ce_zero"] / n_pred, sums["kl_zero"] / n_pos
    out = []
    for j in range(k):
        ce_sae, kl_sae = ce_sae_sum[j] / n_pred, kl_sums[j] / n_pos
        denom = ce_zero - ce_clean
        out.append({
            "ce_clean": ce_clean,
            "ce_sae": ce_sae,
            "ce_zero": ce_zero,
            "ce_loss_score": (ce_zero - ce_sae) / denom if abs(denom) > 1e-12 else math.nan,
            "kl": kl_sae,
            "kl_zero": kl_zero,
            "kl_div_score": (kl_zero - kl_sae) / kl_zero if kl_zero > 1e-12 else math.nan,
            "ce_tokens": int(sums["n_pred"]),
        })
    return out, base


def downstream_metrics(data: Activations, reconstructors: Sequence[Reconstructor], *,
                       budget_s: Optional[float] = None) -> list[dict[str, float]]:
    """:func:`spliced_metrics` per reconstructor on ``data``'s held-out LM rows
    (:meth:`~saesweep.data.base.Activations.splice_port`), within about ``budget_s`` seconds when
    given; empty dicts when ``data`` is not an LM source. Reconstructors map raw activations
    ``[N, d]`` (float32, on the LM's device) to raw reconstructions. The clean and zero-ablated
    figures of a first call are reused by later ones on the same source."""
    if not reconstructors:
        return []
    port = data.splice_port()
    if port is None:
        return [{} for _ in reconstructors]
    out, port.baseline = spliced_metrics(
        port.lm, port.rows, reconstructors, batch_rows=port.batch_rows, baseline=port.baseline,
        shortcut=env("SAESWEEP_SPLICE") != "full",  # full: a whole forward per SAE
        budget_s=budget_s, skip_first=port.skip_first,
    )
    return out
