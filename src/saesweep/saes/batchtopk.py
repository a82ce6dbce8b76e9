"""BatchTopK SAE (Bussmann et al. 2024): top-k over the whole batch in training, a learned
threshold at inference.

Training: ``a = ReLU(pre)`` with ``pre = W_enc (x - b_dec) + b_enc``; the codes keep the
``k * B`` largest entries of ``a`` over the batch of ``B`` tokens (so a token may use more or
fewer than ``k`` latents, ``k`` on average) and zero the rest. After every training step the
member's inference threshold ``theta`` moves towards the smallest kept activation of the batch
(exponential average, momentum :data:`THRESHOLD_MOMENTUM`; the first batch sets it).

Evaluation and export: a JumpReLU with that one threshold for every latent,
``f = pre * 1[pre > theta]``; exported as SAELens's ``jumprelu`` with ``threshold`` = theta
repeated per latent (as SAELens and dictionary_learning do). ``sparsity_coeff`` does not apply;
AuxK trains dead latents as in :mod:`.topk`, and the fused step is TopK's with the selection
over the whole batch (so it ignores the token-chunk plan: the batch is one chunk); measured
against autograd (packs of 4, d 64, batch 4096, 2-core AMX Xeon): 1.66x (fp32) / 2.09x (bf16)
at m 1024, 1.84x / 1.91x at m 4096.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from saesweep.saes.base import PackedSAE, Step
from saesweep.saes.registry import register
from saesweep.saes.topk import AUXK_PARAMS, K_PARAM, AuxK

#: the threshold's exponential average keeps this much of its value per step (about 100 steps)
THRESHOLD_MOMENTUM = 0.99


def batch_top(flat: Tensor, count: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """``flat.topk(count)`` of a 1-D tensor, faster for the fused step's large counts.

    ``topk`` of k * B entries among B * m costs a partial sort of them all (81 ms at B 4096,
    m 1024, k 32 on a 2-core Xeon). Here a strided sample of 2^16 entries gives a value ``q``
    that about 1.25 ``count`` entries exceed; ``topk`` then runs on those candidates only (8 ms),
    which holds the same top ``count`` whenever at least ``count`` entries exceed ``q`` (else
    the plain ``topk``). Ties at the boundary may be broken differently, as any two ``topk``
    calls may."""
    n = flat.numel()
    if count * 4 > n:
        return flat.topk(count, sorted=sorted)
    stride = max(1, n // 65536)
    sample = flat[::stride]
    rank = int(count / n * sample.numel() * 1.25) + 16
    if rank >= sample.numel():
        return flat.topk(count, sorted=sorted)
    q = sample.topk(rank, sorted=False).values.min()
    cand = (flat > q).nonzero().squeeze(1)
    if cand.numel() < count:
        return flat.topk(count, sorted=sorted)
    vals, j = flat[cand].topk(count, sorted=sorted)
    return vals, cand[j]


class BatchTopKCodes(AuxK):
    """Mixin: batch top-k codes in training, the threshold estimate, JumpReLU at inference."""

    def _init_batchtopk(self: PackedSAE) -> None:
        self._init_encoder()
        self._init_auxk()
        self.register_buffer("threshold", torch.full((self.n,), -1.0, device=self.device_))

    def codes(self: PackedSAE, pre: Tensor, train: bool) -> Tensor:
        if not train:
            theta = self.threshold.clamp_min(0)[:, None, None]
            return pre * (pre > theta)
        n, B, m = pre.shape
        with torch.no_grad():  # which entries: batch_top (exact, fast); their values keep the graph
            _, idx, keep = self._select(pre.detach(), slice(0, n))
        vals = torch.relu(pre.reshape(n, 1, B * m).gather(-1, idx))
        if keep is not None:
            vals = vals * keep
        f = torch.zeros_like(pre).reshape(n, 1, B * m).scatter(-1, idx, vals).reshape(n, B, m)
        with torch.no_grad():
            self._update_threshold(slice(0, n), vals.detach().masked_fill(vals.detach() <= 0, float("inf")).amin((1, 2)))
        return f

    def _fused_chunk(self, rows: slice, chunk: Optional[int]) -> Optional[int]:
        return None  # the selection needs every token's pre-activations at once

    def _select(self: PackedSAE, P: Tensor, rows: slice) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The ``k * B`` largest entries of each member's ``[B, m]`` pre-activations, flattened:
        ``vals, idx [k, 1, kmax * B]`` with idx over ``B * m``."""
        kk = self.k[rows]
        n, B, m = P.shape
        kmax = max(1, min(int(kk.max()) * B, B * m))
        mixed = bool((kk != kk.max()).any())
        top = [batch_top(P[i].reshape(-1), kmax, sorted=mixed) for i in range(n)]
        vals = torch.stack([v for v, _ in top])[:, None, :]
        idx = torch.stack([j for _, j in top])[:, None, :]
        keep = torch.arange(kmax, device=P.device) < (kk * B)[:, None, None] if mixed else None
        return vals, idx, keep

    def _after_select(self: PackedSAE, rows: slice, vals: Tensor, keep: Optional[Tensor]) -> None:
        self._update_threshold(rows, vals.masked_fill(vals <= 0, float("inf")).amin((1, 2)))

    def _update_threshold(self: PackedSAE, rows: slice, kept: Tensor) -> None:
        """Move the threshold of members ``rows`` towards ``kept``, the smallest kept activation
        of the batch (inf: none kept, no change); the first batch sets it."""
        th = self.threshold[rows]
        kept = torch.where(torch.isfinite(kept), kept.float(), th)
        th.copy_(torch.where(th < 0, kept, THRESHOLD_MOMENTUM * th + (1 - THRESHOLD_MOMENTUM) * kept))

    @torch.no_grad()
    def after_training(self: PackedSAE, x_held_out: Tensor, batch_size: Optional[int] = None) -> list[dict[str, float]]:
        """Calibrate each member's inference threshold so that its mean L0 on ``x_held_out`` is
        ``k``: the threshold becomes the ``k * N + 1``-th largest activation over the ``N``
        tokens (the running estimate of training lags the codes at short budgets). Each chunk
        of tokens keeps its largest ``4 k`` activations per token as candidates; should a
        chunk hold more above the threshold than it kept, the count is redone with room for all."""
        out = []
        running = self.threshold.clone()
        self.threshold.zero_()  # codes at threshold 0 are ReLU(pre): every candidate
        N = x_held_out.shape[0]
        if batch_size is None:  # a chunk's activations stay within 2^24 values (64 MB)
            batch_size = max(1, 2**24 // self.d_sae)
        for i in range(self.n):
            view = self.member(i)  # one member at a time: a pack's codes would be n times larger
            k = float(self.k[i])
            target = int(round(k * N))
            room = 4
            while True:
                pool, floors = [], []
                for start in range(0, N, batch_size):
                    x = x_held_out[start:start + batch_size].to(self.device_, torch.float32)
                    a = view.encode(x)[0].reshape(-1)
                    cap = min(a.numel(), int(room * k * x.shape[0]) + 1)
                    top = a.topk(cap).values
                    pool.append(top)
                    floors.append(float(top[-1]) if cap < a.numel() else 0.0)
                vals = torch.cat(pool)
                theta = float(vals.topk(target + 1).values[-1]) if target < vals.numel() else 0.0
                if max(floors) <= theta or room * k >= self.d_sae:
                    break
                room *= 4  # a chunk kept too few candidates: count again with more room
            self.threshold[i] = max(theta, 0.0)
            out.append({"threshold_calibrated": max(theta, 0.0), "threshold_running": float(running[i]),
                        "threshold_calibration_tokens": float(N)})
        self.calibration = out
        return out

    def export_metadata(self: PackedSAE, i: int) -> dict:
        done = getattr(self, "calibration", None)
        if not done:
            return {}
        c = done[i]
        return {"threshold_calibration": {
            "what": "the inference threshold set after training so that the mean L0 on held-out tokens is k",
            "k": float(self.k[i]), "tokens": int(c["threshold_calibration_tokens"]),
            "threshold": c["threshold_calibrated"], "running_estimate": c["threshold_running"]}}

    def member_state(self: PackedSAE, i: int, scale: float = 1.0) -> dict[str, Tensor]:
        out = super().member_state(i, scale)
        out["threshold"] = self.threshold[i].clamp_min(0).float().expand(self.d_sae).clone()
        return out

    def load_member_state(self: PackedSAE, state: dict[str, Tensor]) -> None:
        super().load_member_state(state)
        self.threshold.fill_(float(state["threshold"][0]))


@register
class BatchTopKSAE(BatchTopKCodes, PackedSAE):
    name = "batchtopk"
    order = 5
    grid = {"k": [8, 16, 32, 64]}
    saelens_architecture = "jumprelu"
    hyperparams = {**K_PARAM, **AUXK_PARAMS}

    def _init_parameters(self) -> None:
        self._init_batchtopk()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        pre = self.pre_activations(x)
        f = self.codes(pre, train)
        aux = self.auxk_loss(x, pre, f) if train else x.new_zeros(self.n)
        return Step(f, x.new_zeros(self.n), {"auxk": aux})
