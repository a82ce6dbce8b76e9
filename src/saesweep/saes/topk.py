"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with AuxK.

``pre = W_enc (x - b_dec) + b_enc``; the codes keep the ``k`` largest entries of ``pre`` per
token, through a ReLU, and zero the rest (SAELens's ``topk`` architecture computes the same);
``x_hat = W_dec f + b_dec``. There is no sparsity penalty: ``k`` sets L0, so ``sparsity_coeff``
does not apply to this type. Members of one pack may differ in ``k``.

AuxK (Gao et al. section A.2), for dead latents: a latent is dead when it has not fired for
``auxk_dead_tokens`` training tokens (tracked per member in the buffer ``since_fired``). With the
reconstruction error ``e = x - x_hat`` held fixed, ``e_hat = W_dec a`` where ``a`` keeps the
``k_aux`` largest pre-activations among the dead latents (through a ReLU; no bias), and
``aux = auxk_coeff * ||e - e_hat||^2`` per token, in the SSE units of the main loss
(LOSS_CONVENTION). It trains the dead latents' encoder and decoder towards what the live ones
miss. Gao et al. use ``k_aux = 512`` at d 4096-ish widths and coefficient 1/32; here ``k_aux``
defaults to ``d_in / 2`` (dictionary_learning's choice).

No fused step: the autograd step is used (the top-k selection dominates, and a hand-written
gradient of a scatter saves little).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep.saes.base import HyperParam, PackedSAE
from saesweep.saes.registry import register

K_PARAM = {"k": HyperParam(int, 32, "active latents per token (members of a pack may differ)")}
AUXK_PARAMS = {
    "auxk_coeff": HyperParam(float, 1 / 32, "weight of the AuxK loss that trains dead latents (0: off)"),
    "k_aux": HyperParam(int, None, "dead latents the AuxK loss uses per token (default d_in / 2)", optional=True),
    "auxk_dead_tokens": HyperParam(
        int, 250_000, "training tokens without firing after which a latent counts as dead for AuxK"
    ),
}


def keep_top(values: Tensor, k: Tensor) -> Tensor:
    """``values`` ``[n, ..., w]`` with, in each row of its last axis, only member i's ``k[i]``
    largest entries kept (through a ReLU) and the others 0."""
    kmax = max(1, min(int(k.max()), values.shape[-1]))
    top, idx = values.topk(kmax, dim=-1, sorted=True)
    rank = torch.arange(kmax, device=values.device)
    keep = rank < k.view(-1, *([1] * (values.dim() - 1)))
    return torch.zeros_like(values).scatter(-1, idx, torch.relu(top) * keep)


class AuxK:
    """Mixin: ``k``, the dead-latent tracker and the AuxK loss (TopK, BatchTopK, Matryoshka)."""

    uses_sparsity_coeff = False

    def _init_auxk(self: PackedSAE) -> None:
        self.register_buffer("k", self._member_tensor("k", K_PARAM["k"].default).long())
        self.register_buffer("auxk_coeff", self._member_tensor("auxk_coeff", 1 / 32))
        self.register_buffer("auxk_dead_tokens", self._member_tensor("auxk_dead_tokens", 250_000))
        k_aux = [self.d_in // 2 if m.get("k_aux") is None else int(m["k_aux"]) for m in self.hp]
        self.register_buffer("k_aux", torch.tensor(k_aux, device=self.device_))
        self.register_buffer("since_fired", self._zeros(self.d_sae))

    def _init_encoder(self: PackedSAE) -> None:
        self._init_decoder_and_encoder("W_enc")
        self._param("b_enc", self._zeros(self.d_sae))

    def pre_activations(self: PackedSAE, x: Tensor) -> Tensor:
        return torch.matmul(self.centered(x), self.W_enc) + self.b_enc[:, None, :]

    def dead(self) -> Tensor:
        """``[n, m]``: latents that have not fired for ``auxk_dead_tokens`` training tokens."""
        return self.since_fired >= self.auxk_dead_tokens[:, None]

    def reinit_features(self: PackedSAE, row: int, idx: Tensor, dirs: Tensor, window: Tensor) -> None:
        self.since_fired[row, idx] = 0  # a resampled latent gets a fresh dead window

    def auxk_loss(self: PackedSAE, x: Tensor, pre: Tensor, f: Tensor) -> Tensor:
        """AuxK per member (``[n]``), then the firing tracker advances by this batch."""
        dead = self.dead()
        aux = x.new_zeros(self.n)
        if bool(dead.any()) and bool((self.auxk_coeff > 0).any()):
            e = (x - self.decode(f)).detach()
            a = keep_top(pre.masked_fill(~dead[:, None, :], float("-inf")), self.k_aux)
            e_hat = torch.matmul(a, self.W_dec)
            aux = self.auxk_coeff * (e - e_hat).pow(2).sum(-1).mean(-1)
        with torch.no_grad():
            fired = (f.detach() > 0).any(1)
            self.since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        return aux


@register
class TopKSAE(AuxK, PackedSAE):
    name = "topk"
    saelens_architecture = "topk"
    hyperparams = {**K_PARAM, **AUXK_PARAMS}

    def _init_parameters(self) -> None:
        self._init_encoder()
        self._init_auxk()

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        f = keep_top(pre, self.k)
        aux = self.auxk_loss(x, pre, f) if train else x.new_zeros(self.n)
        return f, x.new_zeros(self.n), aux

    def saelens_extra_cfg(self, i: int) -> dict:
        return {"k": int(self.k[i])}
