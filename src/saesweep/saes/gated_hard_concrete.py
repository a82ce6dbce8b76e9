"""Gated hard-concrete SAE: the gated architecture with the Heaviside gate replaced by a
hard-concrete gate on ``pi_gate`` (same sampling and expected-L0 penalty as the hard-concrete
SAE); ``aux = aux_coeff * MSE(x, W_dec^sg z + b_dec^sg)``.
"""

from __future__ import annotations

from torch import Tensor

from . import register
from .base import PackedSAE
from .gated import AUX_PARAM, GatedEncoder
from .hard_concrete import BETA_PARAMS, HardConcreteGates, expected_l0, gates


@register
class GatedHardConcreteSAE(HardConcreteGates, GatedEncoder, PackedSAE):
    name = "gated_hard_concrete"
    saelens_architecture = "gated_hard_concrete"
    hyperparams = {**AUX_PARAM, **BETA_PARAMS}

    def _init_parameters(self) -> None:
        self._init_beta()
        self._init_gated()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        pi_gate, f_mag = self.gate_and_magnitude(x)
        beta = self.beta(progress)
        z = gates(pi_gate, beta, self.generators, train)
        if not train:
            return z * f_mag, x.new_zeros(self.n), x.new_zeros(self.n)
        return z * f_mag, expected_l0(pi_gate, beta), self.aux_loss(x, z)
