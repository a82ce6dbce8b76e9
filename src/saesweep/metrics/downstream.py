"""Downstream metrics: the language model's loss with an SAE's reconstruction spliced into the
hooked residual stream (SAEBench core's ``ce_loss_score`` and ``kl_div_score``)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from saesweep.data.base import Reconstructor

if TYPE_CHECKING:
    from saesweep.data.lm import HookedLM

_LOGIT_ELEMENTS = 2**25  # bound on batch * context * vocab when computing CE/KL
FIRST_ROWS = 4  # rows of the first batch, which times the rest


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
) -> tuple[list[dict[str, float]], list[BatchBaseline]]:
    """SAEBench core's downstream metrics per reconstructor, with SAELens's convention
    (``sae_lens.evals.get_recons_loss``): every position of the hooked residual, the BOS one
    included, is replaced by the reconstruction (or by zeros for the ablation); CE is the mean
    next-token loss over every prediction of the rows, KL(p_clean || p_edited) the mean over
    every position.

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
    ce_sae_sum, kl_sum = [0.0] * k, [0.0] * k

    def splice(f: Optional[Reconstructor]) -> Callable[[Tensor], Tensor]:
        def edit(h: Tensor) -> Tensor:
            if f is None:
                return torch.zeros_like(h)
            return f(h.reshape(-1, h.shape[-1]).float()).reshape(h.shape).to(device=h.device, dtype=h.dtype)

        return edit

    def ce_and_logprobs(logits: Tensor, targets: Tensor) -> tuple[float, Tensor]:
        lp = logits.float().log_softmax(-1)
        return -lp[:, :-1].gather(-1, targets).sum().item(), lp

    def kl(lp_clean: Tensor, p_clean: Tensor, lp: Tensor) -> float:
        return (p_clean * (lp_clean - lp)).sum().item()

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
        targets = ids[:, 1:].unsqueeze(-1)
        clean, tail = lm.clean_and_tail(ids) if shortcut else (lm.logits(ids), None)

        def edited(f: Optional[Reconstructor]) -> Tensor:
            if tail is None:
                return lm.logits(ids, splice(f))
            return tail(splice(f)(tail.residual))

        ce_clean, lp_clean = ce_and_logprobs(clean, targets)
        p_clean = lp_clean.exp()
        if b >= len(base):
            ce_zero, lp = ce_and_logprobs(edited(None), targets)
            base.append({"ce_clean": ce_clean, "ce_zero": ce_zero, "kl_zero": kl(lp_clean, p_clean, lp),
                         "n_pred": targets.numel(), "n_pos": ids.numel()})
        for j, f in enumerate(reconstructors):
            ce, lp = ce_and_logprobs(edited(f), targets)
            ce_sae_sum[j] += ce
            kl_sum[j] += kl(lp_clean, p_clean, lp)
        used = b + 1
    sums = {key: sum(x[key] for x in base[:used]) for key in ("ce_clean", "ce_zero", "kl_zero", "n_pred", "n_pos")}
    n_pred, n_pos = max(sums["n_pred"], 1), max(sums["n_pos"], 1)
    ce_clean, ce_zero, kl_zero = sums["ce_clean"] / n_pred, sums["ce_zero"] / n_pred, sums["kl_zero"] / n_pos
    out = []
    for j in range(k):
        ce_sae, kl_sae = ce_sae_sum[j] / n_pred, kl_sum[j] / n_pos
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
