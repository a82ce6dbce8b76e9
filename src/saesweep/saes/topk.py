"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with AuxK.

``pre = W_enc (x - b_dec) + b_enc``; the codes keep the ``k`` largest entries of ``pre`` per
token, through a ReLU, and zero the rest (SAELens's ``topk`` architecture computes the same);
``x_hat = W_dec f + b_dec``. There is no sparsity penalty: ``k`` sets L0, so ``sparsity_coeff``
does not apply to this type. Members of one pack may differ in ``k``.

AuxK (Gao et al. section A.2), for dead latents: a latent is dead when it has not fired for
``auxk_dead_tokens`` training tokens (tracked per member in the buffer ``since_fired``). With the
reconstruction error ``e = x - x_hat`` held fixed, ``e_hat = W_dec a`` where ``a`` keeps the
``k_aux`` largest pre-activations among the dead latents (through a ReLU; no bias), and
``aux = auxk_coeff * ||e - e_hat||^2`` per token, in the SSE units of the main loss
(LOSS_CONVENTION). It trains the dead latents' encoder and decoder towards what the live ones
miss. Gao et al. use ``k_aux = 512`` at d 4096-ish widths and coefficient 1/32; here ``k_aux``
defaults to ``d_in / 2`` (dictionary_learning's choice).

Fused CPU step (:meth:`AuxK._fused_rows`, shared with BatchTopK and Matryoshka): the ReLU
SAE's step with the ReLU replaced by a top-k selection scattered into a reused ``[chunk, m]``
buffer, and AuxK's products only when a member has dead latents. Measured against the autograd
step (``benchmarks/run.py --sections types``: packs of 4, d 64, batch 4096, a 2-core AMX Xeon,
2026-12-02): 1.56x (fp32) / 1.86x (bf16) at m 1024, 1.80x / 2.06x at m 4096. The per-token
``topk`` itself is most of what is left (18 ms of a 4096 x 1024 step on this machine).

Decoder learning rate: the decoder rows are kept at unit norm and step ``DECODER_LR_SCALE`` (4) times
the learning rate; benchmarks/README.md ("TopK against SAELens's TopK") has the measurements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from typing import Optional

from saesweep.saes.base import HyperParam, PackedSAE, Step
from saesweep.saes.kernels import bmm, bmm_acc, chunks, threshold_backward
from saesweep.saes.registry import register

#: factor on the learning rate of TopK's decoder rows. Adam moves every weight by about the learning
#: rate per step whatever its size, so the speed at which a unit-norm decoder row turns depends on
#: the norm it is kept at: SAELens's TopK keeps rows at their initial norm 0.1 and rescales the
#: codes by it, which turns them ten times faster than unit rows at the same lr.
DECODER_LR_SCALE = 4.0
K_PARAM = {"k": HyperParam(int, 32, "active latents per token (members of a pack may differ)")}
AUXK_PARAMS = {
    "auxk_coeff": HyperParam(float, 1 / 32, "weight of the AuxK loss that trains dead latents (0: off)"),
    "k_aux": HyperParam(int, None, "dead latents the AuxK loss uses per token (default d_in / 2)", optional=True),
    "auxk_dead_tokens": HyperParam(
        int, 250_000, "training tokens without firing after which a latent counts as dead for AuxK"
    ),
}


def keep_top(values: Tensor, k: Tensor) -> Tensor:
    """``values`` ``[n, ..., w]`` with, in each row of its last axis, only member i's ``k[i]``
    largest entries kept (through a ReLU) and the others 0."""
    kmax = max(1, min(int(k.max()), values.shape[-1]))
    top, idx = values.topk(kmax, dim=-1, sorted=True)
    rank = torch.arange(kmax, device=values.device)
    keep = rank < k.view(-1, *([1] * (values.dim() - 1)))
    return torch.zeros_like(values).scatter(-1, idx, torch.relu(top) * keep)


class AuxK:
    """Mixin: ``k``, the dead-latent tracker and the AuxK loss (TopK, BatchTopK, Matryoshka)."""

    uses_sparsity_coeff = False
    fused = True
    aux_terms = ("auxk",)
    # memory hint: the ReLU step's buffers plus the code buffer and AuxK's
    train_wide, eval_wide = 7, 6

    def _init_auxk(self: PackedSAE) -> None:
        self.register_buffer("k", self._member_tensor("k", K_PARAM["k"].default).long())
        self.register_buffer("auxk_coeff", self._member_tensor("auxk_coeff", 1 / 32))
        self.register_buffer("auxk_dead_tokens", self._member_tensor("auxk_dead_tokens", 250_000))
        k_aux = [self.d_in // 2 if m.get("k_aux") is None else int(m["k_aux"]) for m in self.hp]
        self.register_buffer("k_aux", torch.tensor(k_aux, device=self.device_))
        self.register_buffer("since_fired", self._zeros(self.d_sae))

    def _init_encoder(self: PackedSAE) -> None:
        self._init_decoder_and_encoder("W_enc")
        self._param("b_enc", self._zeros(self.d_sae))

    def pre_activations(self: PackedSAE, x: Tensor) -> Tensor:
        return torch.matmul(self.centered(x), self.W_enc) + self.b_enc[:, None, :]

    def dead(self) -> Tensor:
        """``[n, m]``: latents that have not fired for ``auxk_dead_tokens`` training tokens."""
        return self.since_fired >= self.auxk_dead_tokens[:, None]

    def reinit_features(self: PackedSAE, row: int, idx: Tensor, dirs: Tensor, window: Tensor) -> None:
        self.since_fired[row, idx] = 0  # a resampled latent gets a fresh dead window

    def auxk_loss(self: PackedSAE, x: Tensor, pre: Tensor, f: Tensor) -> Tensor:
        """AuxK per member (``[n]``), then the firing tracker advances by this batch."""
        dead = self.dead()
        coeff = self.auxk_coeff * dead.any(-1)  # a member without dead latents has no AuxK term
        aux = x.new_zeros(self.n)
        if bool((coeff > 0).any()):
            e = (x - self.decode(f)).detach()
            a = keep_top(pre.masked_fill(~dead[:, None, :], float("-inf")), self.k_aux)
            e_hat = torch.matmul(a, self.W_dec)
            aux = coeff * (e - e_hat).pow(2).sum(-1).mean(-1)
        with torch.no_grad():
            fired = (f.detach() > 0).any(1)
            self.since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        return aux

    # ------------------------------------------------------------------ fused step
    def _select(self: PackedSAE, P: Tensor, rows: slice) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(vals, idx, keep)`` of the kept pre-activations of ``P`` ``[k, t, m]``: per token, the
        ``k`` largest (``keep`` masks ranks beyond a member's own k in a stacked pack, else None)."""
        kk = self.k[rows]
        kmax = max(1, min(int(kk.max()), P.shape[-1]))
        vals, idx = P.topk(kmax, dim=-1, sorted=kmax != int(kk.min()))
        keep = None if kmax == int(kk.min()) else torch.arange(kmax, device=P.device) < kk[:, None, None]
        return vals, idx, keep

    def _fused_chunk(self: PackedSAE, rows: slice, chunk: Optional[int]) -> Optional[int]:
        return chunk

    def _after_select(self: PackedSAE, rows: slice, vals: Tensor, keep: Optional[Tensor]) -> None:
        """Hook for what the selection updates (BatchTopK's threshold)."""

    def _fused_decode(self, F: Tensor, wd: Tensor, offset: Tensor, x: Tensor, two_s: float, R: Tensor, E: Tensor,
                      G: Tensor, g_wdt: Tensor, first: bool, tmp_d: Optional[Tensor], sse: Tensor,
                      sum_diff: Tensor, prefix_sum: Tensor) -> Tensor:
        """The reconstruction's part of the fused step for one chunk: ``G`` = dL/dF where F > 0,
        ``W_dec``'s gradient accumulated (transposed) into ``g_wdt``, the sums updated (SSE, the
        error summed over tokens for b_dec); returns ``x_hat - x`` (float32)."""
        bmm(F, wd, R)  # x_hat - b_dec
        diff = torch.add(R, offset).sub_(x)  # x_hat - x, float32
        sse += diff.square().sum((1, 2))
        sum_diff += diff.sum(1)
        torch.mul(diff, two_s, out=E)
        bmm(E, wd.transpose(1, 2), G)
        threshold_backward(G, F, 0.0, grad_input=G)
        bmm_acc(g_wdt, E.transpose(1, 2), F, first, tmp_d)
        return diff

    def _fused_rows(self, x, rows, chunk, cdt, progress, sparsity_scale, stats, out) -> None:
        """With e = 2 (x_hat - x) / B and F the kept codes (top-k of ``pre``, through a ReLU):

        g_pre = 1[F > 0] (e W_dec^T); dW_enc = xc^T g_pre; db_enc = sum_t g_pre; dW_dec = F^T e;
        db_dec = sum_t e - W_enc db_enc. AuxK, for members with dead latents: A keeps the k_aux
        largest dead pre-activations (ReLU), r = (x - x_hat) - A W_dec per token, loss
        coeff ||r||^2, so with ea = -2 coeff r / B: g_pre += 1[A > 0] (ea W_dec^T), dW_dec += A^T ea.
        """
        k = rows.stop - rows.start
        B, d = x.shape
        m, f32 = self.d_sae, torch.float32
        chunk = self._fused_chunk(rows, chunk)
        W_enc, b_enc, W_dec, b_dec = (p.detach()[rows] for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec))
        xa = self._centered_ones(x, b_dec, cdt)  # [k, B, d+1]
        wea = self._weight_with_bias("Wea", W_enc, b_enc, cdt)  # [k, d+1, m]
        wd = self._ws("Wd", (k, m, d), cdt)
        wd.copy_(W_dec)
        T = chunk or B
        pre = self._ws("pre", (k, T, m), cdt)
        F = self._ws("F", (k, T, m), cdt)
        g = self._ws("g", (k, T, m), cdt)
        r = self._ws("r", (k, T, d), cdt)
        e = self._ws("e", (k, T, d), cdt)
        dead = self.dead()[rows]
        coeff = self.auxk_coeff[rows] * dead.any(-1)
        use_aux = bool((coeff > 0).any())
        if use_aux:
            A = self._ws("A", (k, T, m), cdt)
            ga = self._ws("ga", (k, T, m), cdt)
            ea = self._ws("ea", (k, T, d), cdt)
            k_aux = self.k_aux[rows]
            kax = max(1, min(int(k_aux.max()), m))
            aux_keep = torch.arange(kax, device=x.device) < k_aux[:, None, None]
            two_c = (-2.0 / B) * coeff[:, None, None]
        g_wea, g_wdt, tmp_e, tmp_d = self._grad_accumulators(k, d, m, cdt)
        two_s = 2.0 / B
        sse = x.new_zeros(k)
        aux_sum = x.new_zeros(k)  # the weighted AuxK SSE
        prefix_sum = x.new_zeros(k)  # Matryoshka's prefixes' SSEs
        nnz = x.new_zeros(k)
        fired = x.new_zeros(k, m)
        sum_diff = x.new_zeros(k, d)
        offset = b_dec[:, None, :]
        for i, (s0, s1) in enumerate(chunks(B, chunk)):
            t = s1 - s0
            P, Fc, G, R, E = pre[:, :t], F[:, :t], g[:, :t], r[:, :t], e[:, :t]
            xs = xa[:, s0:s1]
            bmm(xs, wea, P)
            vals, idx, keep = self._select(P, rows)
            vals.clamp_min_(0)
            if keep is not None:
                vals.mul_(keep)
            self._after_select(rows, vals, keep)
            # the codes: per token (idx over m) or, for a batch-wide selection, over t * m
            Fc.zero_().view(k, vals.shape[1], -1).scatter_(-1, idx, vals)
            latent = idx if vals.shape[1] == t else idx % m
            fired.scatter_add_(-1, latent.flatten(1), (vals > 0).flatten(1).to(f32))
            diff = self._fused_decode(Fc, wd, offset, x[s0:s1], two_s, R, E, G, g_wdt, i == 0, tmp_d,
                                      sse, sum_diff, prefix_sum)
            if use_aux:
                Ac, GA, EA = A[:, :t], ga[:, :t], ea[:, :t]
                avals, aidx = P.masked_fill(~dead[:, None, :], float("-inf")).topk(kax, dim=-1, sorted=True)
                avals.clamp_min_(0).mul_(aux_keep)
                Ac.zero_().scatter_(-1, aidx, avals)
                bmm(Ac, wd, EA)  # e_hat
                res = diff.neg_().sub_(EA)  # (x - x_hat) - e_hat
                aux_sum += coeff * res.square().sum((1, 2))
                torch.mul(res, two_c, out=EA)
                bmm(EA, wd.transpose(1, 2), GA)
                threshold_backward(GA, Ac, 0.0, grad_input=GA)
                G.add_(GA)
            if stats:
                nnz += (vals > 0).sum((1, 2))
            bmm_acc(g_wea, xs.transpose(1, 2), G, i == 0, tmp_e)
            if use_aux:
                bmm_acc(g_wdt, EA.transpose(1, 2), Ac, False, tmp_d)
        db_enc = g_wea[:, d]
        self.W_enc.grad[rows].copy_(g_wea[:, :d])
        self.b_enc.grad[rows].copy_(db_enc)
        self.W_dec.grad[rows].copy_(g_wdt.transpose(1, 2))
        self.b_dec.grad[rows].copy_(sum_diff.mul_(two_s).sub_(torch.bmm(W_enc, db_enc[..., None])[..., 0]))
        self.since_fired[rows].add_(B).masked_fill_(fired > 0, 0)
        terms = {"auxk": aux_sum, "prefix_sse": prefix_sum}
        self._write_stats(out, B, d, sse, x.new_zeros(k), nnz, {t: terms[t] for t in self.aux_terms})


@register
class TopKSAE(AuxK, PackedSAE):
    name = "topk"
    order = 4
    grid = {"k": [8, 16, 32, 64]}
    saelens_architecture = "topk"
    hyperparams = {**K_PARAM, **AUXK_PARAMS}
    #: the decoder directions step DECODER_LR_SCALE times the lr (see the module doc)
    lr_scale = {"W_dec": DECODER_LR_SCALE}
    revision = 1  # 1: the decoder's learning rate (DECODER_LR_SCALE)

    def _init_parameters(self) -> None:
        self._init_encoder()
        self._init_auxk()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        pre = self.pre_activations(x)
        f = keep_top(pre, self.k)
        aux = self.auxk_loss(x, pre, f) if train else x.new_zeros(self.n)
        return Step(f, x.new_zeros(self.n), {"auxk": aux})

    def saelens_extra_cfg(self, i: int) -> dict:
        return {"k": int(self.k[i])}
