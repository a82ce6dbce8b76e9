"""Gated SAE (Rajamanoharan et al. 2024).

``x_enc = W_enc (x - b_dec)``; ``pi_gate = x_enc + b_gate``;
``f_mag = ReLU(exp(r_mag) * x_enc + b_mag)``; ``f = 1[pi_gate > 0] * f_mag``.
Penalty ``P = sum_i ReLU(pi_gate)_i``; auxiliary loss
``aux_coeff * MSE(x, W_dec^sg ReLU(pi_gate) + b_dec^sg)`` with the decoder detached, so the
auxiliary term trains the gate path and never the decoder.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .base import HyperParam, PackedSAE, mse_per_member

AUX_PARAM = {
    "aux_coeff": HyperParam(
        float, 0.03125, "weight of the auxiliary reconstruction through the gate path"
    )
}


class GatedEncoder:
    """Mixin: the gated encoder's parameters and paths, shared with gated hard-concrete."""

    def _init_gated(self: PackedSAE) -> None:
        self._init_decoder_and_encoder("W_enc")
        for name in ("b_gate", "b_mag", "r_mag"):
            self._param(name, self._zeros(self.d_sae))
        self.register_buffer("aux_coeff", self._member_tensor("aux_coeff", 0.03125))

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_enc = torch.matmul(self.centered(x), self.W_enc)
        pi_gate = x_enc + self.b_gate[:, None, :]
        f_mag = torch.relu(x_enc * torch.exp(self.r_mag)[:, None, :] + self.b_mag[:, None, :])
        return pi_gate, f_mag

    def aux_loss(self, x: Tensor, gate_codes: Tensor) -> Tensor:
        """aux_coeff * MSE(x, W_dec^sg g + b_dec^sg): the decoder gets no gradient from it."""
        recon = torch.matmul(gate_codes, self.W_dec.detach()) + self.b_dec.detach()[:, None, :]
        return self.aux_coeff * mse_per_member(x, recon)


@register
class GatedSAE(GatedEncoder, PackedSAE):
    name = "gated"
    saelens_architecture = "gated"
    hyperparams = AUX_PARAM

    def _init_parameters(self) -> None:
        self._init_gated()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        pi_gate, f_mag = self.gate_and_magnitude(x)
        f = (pi_gate > 0).to(f_mag.dtype) * f_mag
        if not train:
            return f, x.new_zeros(self.n), x.new_zeros(self.n)
        relu_gate = torch.relu(pi_gate)
        return f, relu_gate.sum(-1).mean(-1), self.aux_loss(x, relu_gate)
