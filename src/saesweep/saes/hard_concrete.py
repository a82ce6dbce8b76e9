"""Hard-concrete SAE (Louizos et al. 2018 gates on ReLU magnitudes).

Gate logits ``log_alpha`` are ``W_gate (x - b_dec) + b_gate`` when ``input_dependent_gates``
is true, else one learned logit per feature shared by all tokens. Magnitudes are
``ReLU(W_mag (x - b_dec) + b_mag)`` and the codes are ``z * f_mag`` where

* training: ``u ~ U(eps, 1-eps)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
  ``z = clamp(s (zeta - gamma) + gamma, 0, 1)``;
* evaluation: ``z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``, exactly 0 where
  ``sigmoid(log_alpha) <= -gamma / (zeta - gamma)`` and exactly 1 where it is
  ``>= (1 - gamma) / (zeta - gamma)``.

The penalty is the expected L0, ``P = sum_i sigmoid(log_alpha_i - beta log(-gamma / zeta))``.
``beta`` starts at ``initial_beta`` and, when ``final_beta`` is set, anneals exponentially to it
over training. The gate functions here are shared with the gated hard-concrete SAE.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import register
from .base import HyperParam, PackedSAE

GAMMA, ZETA, EPS = -0.1, 1.1, 1e-6
LOG_RATIO = math.log(-GAMMA / ZETA)  # log(-gamma / zeta) < 0

BETA_PARAMS = {
    "initial_beta": HyperParam(float, 0.5, "hard-concrete temperature at the start of training"),
    "final_beta": HyperParam(
        float, None, "if set, beta anneals exponentially to this value by the end", optional=True
    ),
}


def beta_at(initial: Tensor, final: Tensor, progress: float) -> Tensor:
    """Per-member temperature at ``progress`` in [0, 1]; ``final`` holds ``initial`` where unset."""
    return initial * (final / initial) ** progress


def sample_gates(log_alpha: Tensor, beta: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Stochastic training gates ``z`` (shape of ``log_alpha``, ``[n, B, m]``), one generator per member."""
    n = log_alpha.shape[0]
    u = torch.stack(
        [
            torch.rand(log_alpha.shape[1:], generator=generators[i], device=log_alpha.device)
            for i in range(n)
        ]
    ).mul_(1 - 2 * EPS).add_(EPS)
    logistic = torch.log(u) - torch.log1p(-u)
    s = torch.sigmoid((logistic + log_alpha) / beta[:, None, None])
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def eval_gates(log_alpha: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def gates(log_alpha: Tensor, beta: Tensor, generators, train: bool) -> Tensor:
    return sample_gates(log_alpha, beta, generators) if train else eval_gates(log_alpha)


def expected_l0(log_alpha: Tensor, beta: Tensor) -> Tensor:
    """Per-member penalty: sum over features of P(z != 0), mean over tokens -> ``[n]``."""
    p = torch.sigmoid(log_alpha - beta[:, None, None] * LOG_RATIO)
    return p.sum(-1).mean(-1)


class HardConcreteGates:
    """Mixin: the beta buffers and schedule shared by both hard-concrete architectures."""

    def _init_beta(self: PackedSAE) -> None:
        init = self._member_tensor("initial_beta", 0.5)
        final = torch.tensor(
            [float(m["initial_beta"] if m.get("final_beta") is None else m["final_beta"]) for m in self.hp],
            device=self.device_,
        )
        self.register_buffer("initial_beta", init)
        self.register_buffer("final_beta", final)

    def beta(self, progress: float) -> Tensor:
        return beta_at(self.initial_beta, self.final_beta, progress)

    def saelens_extra_cfg(self, i: int) -> dict:
        return {
            "hard_concrete_gamma": GAMMA,
            "hard_concrete_zeta": ZETA,
            "initial_beta": float(self.initial_beta[i]),
            "final_beta": float(self.final_beta[i]),
        }


@register
class HardConcreteSAE(HardConcreteGates, PackedSAE):
    name = "hard_concrete"
    saelens_architecture = "hard_concrete"
    encoder_weights = ("W_gate", "W_mag")
    hyperparams = {
        **BETA_PARAMS,
        "input_dependent_gates": HyperParam(
            bool, True, "gate logits depend on the input (else one learned logit per feature)"
        ),
    }

    def _init_parameters(self) -> None:
        flags = {bool(m.get("input_dependent_gates", True)) for m in self.hp}
        if len(flags) != 1:
            raise ValueError("members of one pack must share input_dependent_gates")
        self.input_dependent = flags.pop()
        self._init_beta()
        if self.input_dependent:
            self._init_decoder_and_encoder("W_mag", "W_gate")
        else:
            self._init_decoder_and_encoder("W_mag")
        self._param("b_mag", self._zeros(self.d_sae))
        # shared logits start at 0 (P(open) ~ sigmoid(2.4 beta)); input-dependent ones
        # start with the gate bias at 0 as well
        self._param("b_gate" if self.input_dependent else "log_alpha", self._zeros(self.d_sae))

    def log_alpha_of(self, xc: Tensor) -> Tensor:
        if self.input_dependent:
            return torch.matmul(xc, self.W_gate) + self.b_gate[:, None, :]
        return self.log_alpha[:, None, :].expand(self.n, xc.shape[1], self.d_sae)

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        xc = self.centered(x)
        beta = self.beta(progress)
        log_alpha = self.log_alpha_of(xc)
        f_mag = torch.relu(torch.matmul(xc, self.W_mag) + self.b_mag[:, None, :])
        z = gates(log_alpha, beta, self.generators, train)
        return z * f_mag, expected_l0(log_alpha, beta), x.new_zeros(self.n)

    def saelens_extra_cfg(self, i: int) -> dict:
        return {**super().saelens_extra_cfg(i), "input_dependent_gates": self.input_dependent}
