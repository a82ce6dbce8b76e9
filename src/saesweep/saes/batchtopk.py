"""BatchTopK SAE (Bussmann et al. 2024): top-k over the whole batch in training, a learned
threshold at inference.

Training: ``a = ReLU(pre)`` with ``pre = W_enc (x - b_dec) + b_enc``; the codes keep the
``k * B`` largest entries of ``a`` over the batch of ``B`` tokens (so a token may use more or
fewer than ``k`` latents, ``k`` on average) and zero the rest. After every training step the
member's inference threshold ``theta`` moves towards the smallest kept activation of the batch
(exponential average, momentum :data:`THRESHOLD_MOMENTUM`; the first batch sets it).

Evaluation and export: a JumpReLU with that one threshold for every latent,
``f = pre * 1[pre > theta]``; exported as SAELens's ``jumprelu`` with ``threshold`` = theta
repeated per latent (as SAELens and dictionary_learning do). ``sparsity_coeff`` does not apply;
AuxK trains dead latents as in :mod:`.topk`. No fused step (autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep.saes.base import PackedSAE
from saesweep.saes.registry import register
from saesweep.saes.topk import AUXK_PARAMS, K_PARAM, AuxK, keep_top

#: the threshold's exponential average keeps this much of its value per step (about 100 steps)
THRESHOLD_MOMENTUM = 0.99


class BatchTopKCodes(AuxK):
    """Mixin: batch top-k codes in training, the threshold estimate, JumpReLU at inference."""

    def _init_batchtopk(self: PackedSAE) -> None:
        self._init_encoder()
        self._init_auxk()
        self.register_buffer("threshold", torch.full((self.n,), -1.0, device=self.device_))

    def codes(self: PackedSAE, pre: Tensor, train: bool) -> Tensor:
        if not train:
            theta = self.threshold.clamp_min(0)[:, None, None]
            return pre * (pre > theta)
        n, B, m = pre.shape
        f = keep_top(pre.reshape(n, 1, B * m), self.k * B).reshape(n, B, m)
        with torch.no_grad():
            kept = f.detach().masked_fill(f.detach() <= 0, float("inf")).amin((1, 2))
            kept = torch.where(torch.isfinite(kept), kept, self.threshold)
            first = self.threshold < 0
            self.threshold.copy_(torch.where(
                first, kept, THRESHOLD_MOMENTUM * self.threshold + (1 - THRESHOLD_MOMENTUM) * kept))
        return f

    def member_state(self: PackedSAE, i: int, scale: float = 1.0) -> dict[str, Tensor]:
        out = super().member_state(i, scale)
        out["threshold"] = self.threshold[i].clamp_min(0).float().expand(self.d_sae).clone()
        return out

    def load_member_state(self: PackedSAE, state: dict[str, Tensor]) -> None:
        super().load_member_state(state)
        self.threshold.fill_(float(state["threshold"][0]))


@register
class BatchTopKSAE(BatchTopKCodes, PackedSAE):
    name = "batchtopk"
    saelens_architecture = "jumprelu"
    hyperparams = {**K_PARAM, **AUXK_PARAMS}

    def _init_parameters(self) -> None:
        self._init_batchtopk()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        f = self.codes(pre, train)
        aux = self.auxk_loss(x, pre, f) if train else x.new_zeros(self.n)
        return f, x.new_zeros(self.n), aux
