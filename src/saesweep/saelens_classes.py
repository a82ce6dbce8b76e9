"""SAELens inference classes for the types SAELens does not have: ``hard_concrete`` and
``gated_hard_concrete``, so that ``sae_lens.SAE.load_from_disk`` loads them (registered by
``saesweep.export.register_saelens()``). Evaluation-mode codes, as saesweep's own: the deterministic gate
``z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)`` times the ReLU magnitude (see
:mod:`saesweep.saes.hard_concrete`). Imports sae_lens: only :mod:`saesweep.export` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from torch import nn


@dataclass
class _HardConcreteGateConfig(SAEConfig):
    """The gate constants and temperatures saesweep writes into cfg.json."""

    hard_concrete_gamma: float = -0.1
    hard_concrete_zeta: float = 1.1
    initial_beta: float = 0.5
    final_beta: Optional[float] = None


@dataclass
class HardConcreteSAEConfig(_HardConcreteGateConfig):
    input_dependent_gates: bool = True

    @classmethod
    def architecture(cls) -> str:
        return "hard_concrete"


@dataclass
class GatedHardConcreteSAEConfig(_HardConcreteGateConfig):
    @classmethod
    def architecture(cls) -> str:
        return "gated_hard_concrete"


def _gate(cfg, log_alpha: torch.Tensor) -> torch.Tensor:
    gamma, zeta = cfg.hard_concrete_gamma, cfg.hard_concrete_zeta
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def _zeros(sae: SAE, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=sae.dtype, device=sae.device))


class _Decoder:
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)


class HardConcreteSAE(_Decoder, SAE[HardConcreteSAEConfig]):
    """Gate logits from ``W_gate`` (or one shared ``log_alpha`` per latent), magnitudes from
    ``W_mag``: the parameters of saesweep's export, under their names."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        d, m = self.cfg.d_in, self.cfg.d_sae
        self.W_enc = None
        self.W_mag = _zeros(self, d, m)
        self.b_mag = _zeros(self, m)
        if self.cfg.input_dependent_gates:
            self.W_gate = _zeros(self, d, m)
            self.b_gate = _zeros(self, m)
        else:
            self.log_alpha = _zeros(self, m)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        log_alpha = sae_in @ self.W_gate + self.b_gate if self.cfg.input_dependent_gates else self.log_alpha
        magnitude = self.activation_fn(self.hook_sae_acts_pre(sae_in @ self.W_mag + self.b_mag))
        return self.hook_sae_acts_post(_gate(self.cfg, log_alpha) * magnitude)


class GatedHardConcreteSAE(_Decoder, SAE[GatedHardConcreteSAEConfig]):
    """The gated encoder (``W_enc``, ``b_gate``, ``r_mag``, ``b_mag``) with a hard-concrete gate."""

    def initialize_weights(self) -> None:
        super().initialize_weights()
        m = self.cfg.d_sae
        self.b_gate, self.b_mag, self.r_mag = _zeros(self, m), _zeros(self, m), _zeros(self, m)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x_enc = self.process_sae_in(x) @ self.W_enc
        magnitude = self.activation_fn(self.hook_sae_acts_pre(x_enc * self.r_mag.exp() + self.b_mag))
        return self.hook_sae_acts_post(_gate(self.cfg, x_enc + self.b_gate) * magnitude)


def register() -> None:
    for cls, cfg_cls in ((HardConcreteSAE, HardConcreteSAEConfig), (GatedHardConcreteSAE, GatedHardConcreteSAEConfig)):
        if cfg_cls.architecture() not in SAE_CLASS_REGISTRY:
            register_sae_class(cfg_cls.architecture(), cls, cfg_cls)
