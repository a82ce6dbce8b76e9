"""Gated SAE (Rajamanoharan et al. 2024).

``x_enc = W_enc (x - b_dec)``; ``pi_gate = x_enc + b_gate``;
``f_mag = ReLU(exp(r_mag) * x_enc + b_mag)``; ``f = 1[pi_gate > 0] * f_mag``.
Penalty ``P = sum_i ReLU(pi_gate)_i``; auxiliary loss
``aux_coeff * SSE(x, W_dec^sg ReLU(pi_gate) + b_dec^sg)`` (per token) with the decoder detached, so the
auxiliary term trains the gate path and never the decoder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from saesweep.saes.base import HyperParam, PackedSAE, Step, mse_per_member
from saesweep.saes.kernels import bmm, bmm_acc, chunks, threshold_backward
from saesweep.saes.registry import register

AUX_PARAM = {
    "aux_coeff": HyperParam(
        float, 1.0, "weight of the auxiliary reconstruction through the gate path (1 as in the paper and SAELens)"
    )
}


class GatedEncoder:
    """Mixin: the gated encoder's parameters and paths, shared with gated hard-concrete."""

    #: the gate path's reconstruction term (``aux_coeff``)
    aux_terms = ("gate_aux",)

    def _init_gated(self: PackedSAE, gate_std: Optional[float] = None) -> None:
        """Encoder as the base class initialises it; with ``gate_std`` (hard-concrete gates, whose
        logits need an input-dependent spread), W_enc starts as the decoder rows times
        gate_std * sqrt(d) and r_mag at minus the log of that factor, so that each magnitude
        starts as the input's projection on its decoder row.

        Not smaller: r_mag is a log, which Adam moves by about lr per step, so a start at the
        ReLU encoder's scale (a further log(d_sae / d_in) = 2.8 lower at ratio 16) left the
        magnitudes input-independent for the whole run (b_mag dominated them): on stories260K
        (ratio 16, 1M tokens) L0 46 / 162 at c = 0.1 / 0.3 with FVU 0.44 / 0.34; from the
        projection, with the hard-concrete resampling start, L0 99 / 28 with FVU 0.064 / 0.28."""
        self._init_decoder_and_encoder("W_enc")
        for name in ("b_gate", "b_mag", "r_mag"):
            self._param(name, self._zeros(self.d_sae))
        if gate_std is not None:
            with torch.no_grad():
                self.W_enc.mul_(self.gate_init_scale(gate_std) / self.encoder_init_scale)
                self.r_mag.fill_(-math.log(self.gate_init_scale(gate_std)))
        self.register_buffer("aux_coeff", self._member_tensor("aux_coeff", 1.0))

    def aux_weight(self) -> Tensor:
        """Per-member weight of the auxiliary SSE (``aux_coeff``)."""
        return self.aux_coeff

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_enc = torch.matmul(self.centered(x), self.W_enc)
        pi_gate = x_enc + self.b_gate[:, None, :]
        f_mag = torch.relu(x_enc * torch.exp(self.r_mag)[:, None, :] + self.b_mag[:, None, :])
        return pi_gate, f_mag

    def aux_loss(self, x: Tensor, gate_codes: Tensor) -> Tensor:
        """aux_coeff * SSE(x, W_dec^sg g + b_dec^sg) per token: the decoder gets no gradient from it."""
        recon = torch.matmul(gate_codes, self.W_dec.detach()) + self.b_dec.detach()[:, None, :]
        return self.aux_weight() * mse_per_member(x, recon) * self.d_in

    def _gated_setup(self, x: Tensor, rows: slice, cdt: torch.dtype):
        """Per-step operands of the fused gated encoder: x - b_dec with ones, [W_enc; b_gate],
        [W_dec | 1], exp(r_mag) and b_mag - b_gate exp(r_mag) (so f_mag = ReLU(pi exp(r) + c))."""
        W_enc, b_gate, b_mag, r_mag, b_dec = (
            p.detach()[rows] for p in (self.W_enc, self.b_gate, self.b_mag, self.r_mag, self.b_dec))
        xa = self._centered_ones(x, b_dec, cdt)
        wea = self._weight_with_bias("Wea", W_enc, b_gate, cdt)
        wda = self._decoder_with_ones(self.W_dec.detach()[rows], cdt)
        er = torch.exp(r_mag)
        c_mag = b_mag - b_gate * er
        return xa, wea, wda, er, c_mag

    @staticmethod
    def _gated_sums(x: Tensor, k: int, m: int, cdt: torch.dtype) -> tuple:
        """Zeroed running sums of a gated step: sse, sse_aux, penalty, nnz ``[k]``; sum_diff
        ``[k, d]``; db_mag ``[k, m]``; db_gate ``[k, m]`` in bf16 only (see :meth:`_gated_grads`)."""
        sse, sse_aux, penalty, nnz = (x.new_zeros(k) for _ in range(4))
        db_gate = x.new_zeros(k, m) if cdt != torch.float32 else None
        return sse, sse_aux, penalty, nnz, x.new_zeros(k, x.shape[1]), x.new_zeros(k, m), db_gate

    @staticmethod
    def _chunk_errors(R: Tensor, RA: Tensor, offset: Tensor, xt: Tensor, two_s: float, aux_c: Tensor,
                      E: Tensor, EA: Tensor, sse: Tensor, sse_aux: Tensor, sum_diff: Tensor) -> None:
        """From a chunk's decodes ``R`` (the SAE's) and ``RA`` (the aux path's), both without
        b_dec: E = dL/dx_hat, EA = dL_aux/dr_aux, and the running sums of squared errors and of
        x_hat - x (for b_dec's gradient)."""
        d = xt.shape[-1]
        diff = torch.add(R[..., :d], offset).sub_(xt)
        diff_a = torch.add(RA[..., :d], offset).sub_(xt)
        sse += diff.square().sum((1, 2))
        sse_aux += diff_a.square().sum((1, 2))
        sum_diff += diff.sum(1)
        torch.mul(diff, two_s, out=E)
        torch.mul(diff_a, (aux_c * two_s)[:, None, None], out=EA)

    @staticmethod
    def _chunk_grads(first: bool, xs: Tensor, g_pi: Tensor, g_mag: Tensor, F: Tensor, E: Tensor, er_c: Tensor,
                     acc: tuple, db_gate: Optional[Tensor], nnz: Tensor, stats: bool) -> None:
        """A chunk's share of the encoder and decoder gradients: g_xenc = g_pi + g_mag exp(r_mag)
        (written over ``g_pi``) into ``acc`` = (g_wea, g_wdt, tmp_e, tmp_d); in bf16 also b_gate's
        own sum (``db_gate``); the chunk's non-zero codes into ``nnz`` when ``stats``."""
        g_wea, g_wdt, tmp_e, tmp_d = acc
        if db_gate is not None:
            db_gate += g_pi.sum(1, dtype=torch.float32)
        g_pi.addcmul_(g_mag, er_c)  # g_xenc
        if stats:
            nnz += torch.count_nonzero(F, dim=(1, 2))
        bmm_acc(g_wea, xs.transpose(1, 2), g_pi, first, tmp_e)
        bmm_acc(g_wdt, E.transpose(1, 2), F, first, tmp_d)

    def _gated_grads(self, rows: slice, g_wea: Tensor, g_wdt: Tensor, db_mag: Tensor, er: Tensor,
                     sum_e: Tensor, db_gate: Optional[Tensor] = None) -> None:
        """Parameter gradients from the accumulated sums of a gated step.

        ``g_wea = xa^T g_xenc`` (last row: sum_t g_xenc), ``g_wdt = e^T f``, ``db_mag = sum_t g_mag``
        where g_mag = dL/d(mag pre-activation) and g_xenc = g_pi + g_mag exp(r). ``db_gate`` =
        sum_t g_pi when summed directly (bf16: the difference below would cancel badly).
        dL/dr = sum_t g_mag (x_enc exp(r)) = sum_t g_mag (mag_pre - b_mag), and where g_mag is not
        zero mag_pre = f, so sum_t g_mag mag_pre = sum_t (e W_dec^T) f = rowdot(f^T e, W_dec).
        """
        d = self.d_in
        W_enc, W_dec, b_mag = (p.detach()[rows] for p in (self.W_enc, self.W_dec, self.b_mag))
        sum_gx = g_wea[:, d]
        self.W_enc.grad[rows].copy_(g_wea[:, :d])
        self.b_mag.grad[rows].copy_(db_mag)
        self.b_gate.grad[rows].copy_(sum_gx - er * db_mag if db_gate is None else db_gate)
        self.r_mag.grad[rows].copy_((g_wdt * W_dec.transpose(1, 2)).sum(1) - b_mag * db_mag)
        self.W_dec.grad[rows].copy_(g_wdt.transpose(1, 2))
        self.b_dec.grad[rows].copy_(sum_e - torch.bmm(W_enc, sum_gx[..., None])[..., 0])


@register
class GatedSAE(GatedEncoder, PackedSAE):
    name = "gated"
    classic, order = True, 2
    grid = {"aux_coeff": [0.01, 0.03125, 0.1]}
    saelens_architecture = "gated"
    hyperparams = AUX_PARAM
    fused = True
    # memory hint: 7 wide tensors measured at the training peak, plus slack (see PackedSAE)
    train_wide, eval_wide = 9, 6
    #: P = sum ReLU(pi_gate) is a gate pre-activation, not a code magnitude (exp(r_mag) rescales
    #: those), so per unit of coefficient it constrains less than ReLU's L1; with 2 the classic
    #: coefficients 0.01-0.3 span dense to sparse on real activations (benchmarks/README.md).
    penalty_scale = 2.0

    def _init_parameters(self) -> None:
        self._init_gated()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        pi_gate, f_mag = self.gate_and_magnitude(x)
        f = (pi_gate > 0).to(f_mag.dtype) * f_mag
        if not train:
            return Step(f, x.new_zeros(self.n))
        relu_gate = torch.relu(pi_gate)
        return Step(f, relu_gate.sum(-1).mean(-1), {"gate_aux": self.aux_loss(x, relu_gate)})

    def _fused_rows(self, x, rows, chunk: Optional[int], cdt, progress, sparsity_scale, stats, out) -> None:
        """With e = 2 (x_hat - x) / B, e_aux = aux_coeff 2 (r_aux - x) / B, kappa = c s / B:

        g_mag = 1[f > 0] (e W_dec^T) (f > 0 iff pi > 0 and f_mag > 0);
        g_pi = 1[pi > 0] (e_aux W_dec^T + kappa) (penalty and aux both go through ReLU(pi));
        g_xenc = g_pi + g_mag exp(r_mag); dW_enc = xc^T g_xenc; the rest in :meth:`_gated_grads`.
        """
        k = rows.stop - rows.start
        B, d = x.shape
        m, f32 = self.d_sae, torch.float32
        xa, wea, wda, er, c_mag = self._gated_setup(x, rows, cdt)
        wdt = wda.transpose(1, 2)
        er_c, c_c = er[:, None, :].to(cdt), c_mag[:, None, :].to(cdt)
        T = chunk or B
        pi = self._ws("pi", (k, T, m), cdt)
        f = self._ws("f", (k, T, m), cdt)
        h = self._ws("h", (k, T, m), cdt)  # ReLU(pi), then g_mag
        ga = self._ws("ga", (k, T, m), cdt)  # e_aux W_dec^T + kappa, then g_pi, then g_xenc
        r = self._ws("r", (k, T, d + 1), cdt)
        ra = self._ws("ra", (k, T, d + 1), cdt)
        e = self._ws("e", (k, T, d), cdt)
        ea = self._ws("ea", (k, T, d + 1), cdt)
        two_s, kappa = self._step_scales(rows, B, sparsity_scale)
        ea[..., d] = kappa[:, None]
        acc = g_wea, g_wdt, _, _ = self._grad_accumulators(k, d, m, cdt)
        aux_c = self.aux_weight()[rows]
        sse, sse_aux, penalty, nnz, sum_diff, db_mag, db_gate = self._gated_sums(x, k, m, cdt)
        offset = self.b_dec.detach()[rows][:, None, :]
        for i, (s0, s1) in enumerate(chunks(B, chunk)):
            t = s1 - s0
            PI, F, H, GA, R, RA, E, EA = (b[:, :t] for b in (pi, f, h, ga, r, ra, e, ea))
            xs = xa[:, s0:s1]
            bmm(xs, wea, PI)  # pi = x_enc + b_gate
            torch.addcmul(c_c, PI, er_c, out=F).clamp_min_(0)  # f_mag
            threshold_backward(F, PI, 0.0, grad_input=F)  # f = 1[pi > 0] f_mag
            torch.clamp_min(PI, 0, out=H)  # ReLU(pi)
            bmm(F, wda, R)
            bmm(H, wda, RA)  # [aux recon - b_dec | sum_i ReLU(pi)_i]
            self._chunk_errors(R, RA, offset, x[s0:s1], two_s, aux_c, E, EA[..., :d], sse, sse_aux, sum_diff)
            penalty += RA[..., d].sum(1, dtype=f32)
            bmm(E, wdt[:, :d], H)  # e W_dec^T
            threshold_backward(H, F, 0.0, grad_input=H)  # g_mag
            db_mag += H.sum(1, dtype=f32)
            bmm(EA, wdt, GA)  # e_aux W_dec^T + kappa
            threshold_backward(GA, PI, 0.0, grad_input=GA)  # g_pi
            self._chunk_grads(i == 0, xs, GA, H, F, E, er_c, acc, db_gate, nnz, stats)
        self._gated_grads(rows, g_wea, g_wdt, db_mag, er, sum_diff.mul_(two_s), db_gate)
        self._write_stats(out, B, d, sse, penalty, nnz, {"gate_aux": aux_c * sse_aux})
