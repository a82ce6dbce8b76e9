"""ReLU SAE: f = ReLU(W_enc (x - b_dec) + b_enc), x_hat = W_dec f + b_dec, P = sum |f_i|."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from saesweep.saes.base import PackedSAE, Step
from saesweep.saes.kernels import bmm, bmm_acc, chunks, threshold_backward
from saesweep.saes.registry import register


@register
class ReLUSAE(PackedSAE):
    name = "relu"
    classic, order = True, 0
    saelens_architecture = "standard"
    fused = True
    # memory hint: about 2.2 wide tensors measured at the peak of the autograd step and of
    # evaluation since both work in place (3.3 before), plus slack (see PackedSAE)
    train_wide, eval_wide = 3, 3

    def _init_parameters(self) -> None:
        self._init_decoder_and_encoder("W_enc")
        self._param("b_enc", self._zeros(self.d_sae))

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        f = torch.matmul(self.centered(x), self.W_enc).add_(self.b_enc[:, None, :]).relu_()
        zero = x.new_zeros(self.n)
        if not train:  # evaluation computes its own L1; this pass was a tenth of it
            return Step(f, zero)
        return Step(f, f.sum(-1).mean(-1))  # f >= 0, so |f| = f

    def _fused_rows(self, x, rows, chunk: Optional[int], cdt, progress, sparsity_scale, stats, out) -> None:
        """Per token, with e = dL/dx_hat = 2 (x_hat - x) / B and kappa = c s / B (:meth:`_step_scales`):

        g_pre = 1[f > 0] (e W_dec^T + kappa); dW_enc = xc^T g_pre; db_enc = sum_t g_pre;
        dW_dec = f^T e; db_dec = sum_t e - W_enc db_enc (b_dec also centres the input).
        Two elementwise passes over [chunk, m] (ReLU, its mask); the rest are five products.
        """
        k = rows.stop - rows.start
        B, d = x.shape
        m, f32 = self.d_sae, torch.float32
        W_enc, b_enc, W_dec, b_dec = (p.detach()[rows] for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec))
        xa = self._centered_ones(x, b_dec, cdt)  # [k, B, d+1]
        wea = self._weight_with_bias("Wea", W_enc, b_enc, cdt)  # [k, d+1, m]
        wda = self._decoder_with_ones(W_dec, cdt)  # [k, m, d+1]
        T = chunk or B
        pre = self._ws("pre", (k, T, m), cdt)
        g = self._ws("g", (k, T, m), cdt)
        r = self._ws("r", (k, T, d + 1), cdt)
        ea = self._ws("ea", (k, T, d + 1), cdt)
        # last column of e: kappa, so that e_aug @ [W_dec^T; 1] = e W_dec^T + kappa
        two_s, kappa = self._step_scales(rows, B, sparsity_scale)
        ea[..., d] = kappa[:, None]
        g_wea, g_wdt, tmp_e, tmp_d = self._grad_accumulators(k, d, m, cdt)
        sse = x.new_zeros(k)
        l1 = x.new_zeros(k)
        nnz = x.new_zeros(k)
        sum_diff = x.new_zeros(k, d)
        offset = b_dec[:, None, :]
        for i, (s0, s1) in enumerate(chunks(B, chunk)):
            t = s1 - s0
            P, G, R, E = pre[:, :t], g[:, :t], r[:, :t], ea[:, :t]
            xs = xa[:, s0:s1]
            bmm(xs, wea, P)
            P.clamp_min_(0)  # f = ReLU(pre), in place
            bmm(P, wda, R)  # [x_hat - b_dec | sum_i f_i]
            diff = torch.add(R[..., :d], offset).sub_(x[s0:s1])  # x_hat - x, float32
            sse += diff.square().sum((1, 2))
            sum_diff += diff.sum(1)
            l1 += R[..., d].sum(1, dtype=f32)
            torch.mul(diff, two_s, out=E[..., :d])
            bmm(E, wda.transpose(1, 2), G)  # e W_dec^T + kappa
            threshold_backward(G, P, 0.0, grad_input=G)  # g_pre
            if stats:
                nnz += torch.count_nonzero(P, dim=(1, 2))
            bmm_acc(g_wea, xs.transpose(1, 2), G, i == 0, tmp_e)
            bmm_acc(g_wdt, E[..., :d].transpose(1, 2), P, i == 0, tmp_d)
        db_enc = g_wea[:, d]
        self.W_enc.grad[rows].copy_(g_wea[:, :d])
        self.b_enc.grad[rows].copy_(db_enc)
        self.W_dec.grad[rows].copy_(g_wdt.transpose(1, 2))
        self.b_dec.grad[rows].copy_(sum_diff.mul_(two_s).sub_(torch.bmm(W_enc, db_enc[..., None])[..., 0]))
        self._write_stats(out, B, d, sse, l1, nnz)
