"""ReLU SAE: f = ReLU(W_enc (x - b_dec) + b_enc), x_hat = W_dec f + b_dec, P = sum |f_i|."""

from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .base import PackedSAE


@register
class ReLUSAE(PackedSAE):
    name = "relu"
    saelens_architecture = "standard"

    def _init_parameters(self) -> None:
        self._init_decoder_and_encoder("W_enc")
        self._param("b_enc", self._zeros(self.d_sae))

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        f = torch.relu(torch.matmul(self.centered(x), self.W_enc) + self.b_enc[:, None, :])
        penalty = f.sum(-1).mean(-1)  # f >= 0, so |f| = f
        return f, penalty, penalty.new_zeros(self.n)
