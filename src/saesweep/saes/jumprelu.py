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

Exported as SAELens's ``jumprelu`` (``threshold`` = theta). No fused step (autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep.saes.base import HyperParam, PackedSAE
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
    saelens_architecture = "jumprelu"
    # a count penalty, as the hard-concrete SAE's (see HardConcreteGates)
    penalty_scale = 0.1
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

    def reinit_features(self, row: int, idx: Tensor, dirs: Tensor, window: Tensor) -> None:
        """A resampled latent starts at the initial threshold (the generic reset sets 0)."""
        self.threshold.data[row, idx] = float(self.hp[row].get("jumprelu_init_threshold", 0.001))

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        pre = torch.matmul(self.centered(x), self.W_enc) + self.b_enc[:, None, :]
        theta = self.threshold.clamp_min(0)[:, None, :]
        gate, f = JumpFn.apply(pre, theta, self.bandwidth[:, None, None])
        return f, gate.sum(-1).mean(-1), x.new_zeros(self.n)
