"""JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping ahead").

``pre = W_enc (x - b_dec) + b_enc``; ``f = ReLU(pre) * H(pre - theta)`` with a learned
per-latent threshold ``theta`` (the parameter ``threshold``, as dictionary_learning keeps it; a
``log_threshold`` as in SAELens moved too slowly here: Adam changes a log by about lr per step,
so from 0.001 the threshold could reach only about 0.04 in 3,900 steps, and L0 stayed at 135
for every coefficient on stories260K); ``x_hat = W_dec f + b_dec``. The penalty
is the L0 itself, ``P = sum_i H(pre_i - theta_i)`` (a count, like the hard-concrete types'
expected L0, hence the same ``penalty_scale``).

H has no useful derivative, so both uses of it pass a straight-through estimator with the
rectangle-kernel pseudo-derivative of bandwidth ``eps`` (``jumprelu_bandwidth``), as in the
paper and SAELens: with ``K(u) = 1[|u| < 1/2]``,

* ``d/dtheta H(pre - theta) = -(1/eps) K((pre - theta)/eps)`` and ``d/dpre H = 0``;
* ``d/dtheta JumpReLU = -(theta/eps) K((pre - theta)/eps)``, ``d/dpre JumpReLU = H(pre - theta)``.

Exported as SAELens's ``jumprelu`` (``threshold`` = theta). The fused CPU step
(:meth:`JumpReLUSAE._fused_rows`) replaces the autograd graph's dozen passes over ``[B, m]``
with five; ``benchmarks/run.py --sections types`` measured 1.89x / 1.94x the autograd step in
fp32 at m 1024 / 4096 (packs of 4, d 64, batch 4096, 2-core AMX Xeon) and 1.6x in bf16, where
its pre-activations stay fp32 (below): bf16 gains JumpReLU nothing on that machine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from typing import Optional

from saesweep.saes.base import HyperParam, PackedSAE, Step
from saesweep.saes.kernels import bmm, bmm_acc, chunks, threshold_backward
from saesweep.saes.registry import register


class JumpFn(torch.autograd.Function):
    """``(H(pre - theta), ReLU(pre) H(pre - theta))`` with the pseudo-derivatives above.

    ``pre [n, B, m]``, ``theta [n, 1, m]``, ``eps [n, 1, 1]``. The two outputs share the mask
    and the kernel, so they are one op."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        gate = (pre > theta).to(pre.dtype)
        ctx.save_for_backward(pre, theta, eps, gate)
        return gate, pre.clamp_min(0) * gate

    @staticmethod
    def backward(ctx, g_gate: Tensor, g_f: Tensor):
        pre, theta, eps, gate = ctx.saved_tensors
        kernel = (((pre - theta) / eps).abs() < 0.5).to(pre.dtype) / eps
        g_theta = -(kernel * (g_gate + theta * g_f)).sum(1, keepdim=True)
        return g_f * gate, g_theta, None


@register
class JumpReLUSAE(PackedSAE):
    name = "jumprelu"
    order = 6
    saelens_architecture = "jumprelu"
    fused = True
    # memory hint: pre, the gradient, theta's kernel scratch, codes; autograd keeps more
    train_wide, eval_wide = 8, 6
    # a count penalty, as the hard-concrete SAE's (see HardConcreteGates)
    penalty_scale = 0.1
    # with target_l0: a latent whose threshold the penalty drove past all its inputs gets no
    # gradient again (the kernel's band is empty), so the coefficient follows the quadratic
    # penalty, which turns negative below the target instead of overshooting it
    l0_rule = "quadratic"
    initial_coeff = 1.0
    hyperparams = {
        "jumprelu_init_threshold": HyperParam(float, 0.001, "every latent's threshold at the start"),
        "jumprelu_bandwidth": HyperParam(float, 0.001, "width of the straight-through estimator's kernel"),
    }

    def _init_parameters(self) -> None:
        self._init_decoder_and_encoder("W_enc")
        self._param("b_enc", self._zeros(self.d_sae))
        init = self._member_tensor("jumprelu_init_threshold", 0.001)
        self._param("threshold", init[:, None].expand(self.n, self.d_sae).clone())
        self.register_buffer("bandwidth", self._member_tensor("jumprelu_bandwidth", 0.001))

    @torch.no_grad()
    def after_step(self) -> None:
        """Thresholds stay at or above zero. Adam moves a threshold by about lr per step, more
        than its start; below zero the latent would be a plain ReLU whose threshold, behind the
        clamp, never gets a gradient again: neither the penalty nor the reconstruction could
        move it back."""
        super().after_step()
        self.threshold.clamp_(min=0)

    def reinit_features(self, row: int, idx: Tensor, dirs: Tensor, window: Tensor) -> None:
        """A resampled latent starts at the initial threshold (the generic reset sets 0)."""
        self.threshold.data[row, idx] = float(self.hp[row].get("jumprelu_init_threshold", 0.001))

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 pre (see _fused_rows)
            pre = torch.matmul(self.centered(x).float(), self.W_enc.float()) + self.b_enc[:, None, :]
        theta = self.threshold.clamp_min(0)[:, None, :]
        gate, f = JumpFn.apply(pre, theta, self.bandwidth[:, None, None])
        return Step(f, gate.sum(-1).mean(-1))

    def _fused_rows(self, x, rows, chunk: Optional[int], cdt, progress, sparsity_scale, stats, out) -> None:
        """With e = 2 (x_hat - x) / B, D = pre - theta, kappa the penalty's weight per token,
        and the rectangle kernel K = 1[|D| < eps / 2] / eps:

        F = pre 1[D > 0]; g_f = e W_dec^T; g_pre = 1[D > 0] g_f; dW_enc = xc^T g_pre;
        db_enc = sum_t g_pre; dW_dec = F^T e; db_dec = sum_t e - W_enc db_enc;
        dtheta_j = -sum_t K_tj (kappa + theta_j g_f,tj), through theta = max(threshold, 0).
        Passes over [chunk, m]: D, the gate (zeroing pre in place), |D| and the kernel's mask,
        the kernel's sums, the gradient's gate.
        """
        k = rows.stop - rows.start
        B, d = x.shape
        m, f32 = self.d_sae, torch.float32
        W_enc, b_enc, W_dec, b_dec, thr = (
            p.detach()[rows] for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold))
        theta = thr.clamp_min(0)  # [k, m]
        theta_c = theta[:, None, :]
        half = (self.bandwidth[rows] / 2)[:, None, None]
        # the pre-activations stay float32 in a bf16 step: the kernel's band (eps = 1e-3) is
        # narrower than bf16's spacing at their size, so a bf16 pre-activation would count
        # the tokens inside it wrongly (measured: L0 1.4-1.6x fp32's at the same coefficient)
        xa = self._centered_ones(x, b_dec, f32)
        xc = xa if cdt == f32 else self._ws("xa_c", tuple(xa.shape), cdt).copy_(xa)
        wea = self._weight_with_bias("Wea", W_enc, b_enc, f32)
        wd = self._ws("Wd", (k, m, d), cdt)
        wd.copy_(W_dec)
        T = chunk or B
        pre, dd = (self._ws(name, (k, T, m), f32) for name in ("pre", "D"))
        g = self._ws("g", (k, T, m), cdt)
        codes = pre if cdt == f32 else self._ws("F", (k, T, m), cdt)
        r, e = (self._ws(name, (k, T, d), cdt) for name in ("r", "e"))
        two_s, kappa = self._step_scales(rows, B, sparsity_scale)
        g_wea, g_wdt, tmp_e, tmp_d = self._grad_accumulators(k, d, m, cdt)
        sse, nnz = x.new_zeros(k), x.new_zeros(k)
        sum_diff = x.new_zeros(k, d)
        band = x.new_zeros(k, m)  # sum_t 1[|D| < eps/2]
        band_g = x.new_zeros(k, m)  # sum_t 1[|D| < eps/2] g_f
        offset = b_dec[:, None, :]
        for i, (s0, s1) in enumerate(chunks(B, chunk)):
            t = s1 - s0
            P, D, G, R, E, F = pre[:, :t], dd[:, :t], g[:, :t], r[:, :t], e[:, :t], codes[:, :t]
            bmm(xa[:, s0:s1], wea, P)
            torch.sub(P, theta_c, out=D)
            threshold_backward(P, D, 0.0, grad_input=P)  # F = pre where pre > theta, in place
            nnz += torch.count_nonzero(P, dim=(1, 2))
            if F is not P:
                F.copy_(P)
            bmm(F, wd, R)
            diff = torch.add(R, offset).sub_(x[s0:s1])
            sse += diff.square().sum((1, 2))
            sum_diff += diff.sum(1)
            torch.mul(diff, two_s, out=E)
            bmm(E, wd.transpose(1, 2), G)  # g_f
            torch.sub(half, D.abs_(), out=D)  # > 0 inside the kernel's band
            band += (D > 0).sum(1, dtype=f32)
            if G.dtype == f32:
                band_g += threshold_backward(G, D, 0.0, grad_input=D).sum(1)  # (D reused)
            else:
                band_g += torch.where(D > 0, G, 0).sum(1, dtype=f32)
            threshold_backward(G, F, 0.0, grad_input=G)  # g_pre
            bmm_acc(g_wea, xc[:, s0:s1].transpose(1, 2), G, i == 0, tmp_e)
            bmm_acc(g_wdt, E.transpose(1, 2), F, i == 0, tmp_d)
        db_enc = g_wea[:, d]
        self.W_enc.grad[rows].copy_(g_wea[:, :d])
        self.b_enc.grad[rows].copy_(db_enc)
        self.W_dec.grad[rows].copy_(g_wdt.transpose(1, 2))
        self.b_dec.grad[rows].copy_(sum_diff.mul_(two_s).sub_(torch.bmm(W_enc, db_enc[..., None])[..., 0]))
        g_theta = -(band * kappa[:, None] + theta * band_g) / self.bandwidth[rows][:, None]
        self.threshold.grad[rows].copy_(g_theta * (thr >= 0))
        self._write_stats(out, B, d, sse, nnz, nnz)
