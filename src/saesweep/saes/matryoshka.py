"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima et al. 2025; Nabeshima 2024).

The latents are split into nested prefixes: ``group_fractions`` (increasing, the last 1) mark
where each prefix ends, as fractions of ``d_sae``. Codes are BatchTopK codes (:mod:`.batchtopk`,
threshold and inference included). Every prefix must reconstruct the input on its own:

``loss = sum_j SSE(x, W_dec[:p_j] f[:p_j] + b_dec) + AuxK``

(the last prefix is the whole dictionary, the base class's SSE; the others are the ``aux``
term), so early latents learn general features and later ones refine them. Partial
reconstructions are cumulative sums of per-group decodes: one full decode's cost. Exported as
SAELens's ``jumprelu`` (inference is BatchTopK's). ``sparsity_coeff`` does not apply.

The fused step is BatchTopK's with the reconstruction part replaced (:meth:`MatryoshkaSAE._fused_decode`):
a latent of group g is in every prefix from g on, so its gradient is ``(sum_{j >= g} e_j) W_dec^T``
with ``e_j`` prefix j's error: one product per group over suffix sums of the errors, the
same FLOPs as one full product. Measured against autograd (packs of 4, d 64, batch 4096,
2-core AMX Xeon): 1.98x (fp32) / 2.14x (bf16) at m 1024, 2.36x / 2.33x at m 4096.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from saesweep.saes.base import HyperParam, PackedSAE, Step
from saesweep.saes.batchtopk import BatchTopKCodes
from saesweep.saes.hparam_types import GroupFractions, parse_fractions
from saesweep.saes.kernels import bmm, bmm_acc, threshold_backward
from saesweep.saes.registry import register
from saesweep.saes.topk import AUXK_PARAMS, K_PARAM


@register
class MatryoshkaSAE(BatchTopKCodes, PackedSAE):
    name = "matryoshka"
    order = 7
    #: every prefix but the whole dictionary reconstructs on its own; AuxK as TopK's
    aux_terms = ("prefix_sse", "auxk")
    grid = {"k": [8, 16, 32, 64]}
    saelens_architecture = "jumprelu"
    hyperparams = {
        **K_PARAM,
        **AUXK_PARAMS,
        "group_fractions": HyperParam(
            GroupFractions, "0.0625,0.125,0.25,0.5,1",
            "where the nested prefixes end, as fractions of d_sae (comma-separated, ending at 1)",
            per_member=False,
        ),
    }

    def _init_parameters(self) -> None:
        fractions = {m.get("group_fractions") or "0.0625,0.125,0.25,0.5,1" for m in self.hp}
        if len(fractions) != 1:
            raise ValueError("members of one pack must share group_fractions")
        ends = [max(1, round(f * self.d_sae)) for f in parse_fractions(fractions.pop())]
        self.bounds = [0, *sorted(set(ends))]
        self._init_batchtopk()

    def prefix_sse(self, x: Tensor, f: Tensor) -> Tensor:
        """Sum over the prefixes but the whole dictionary of each one's SSE per token: ``[n]``."""
        part = self.b_dec[:, None, :].expand(self.n, x.shape[0], self.d_in)
        total = x.new_zeros(self.n)
        for a, b in zip(self.bounds[:-2], self.bounds[1:-1]):
            part = part + torch.matmul(f[..., a:b], self.W_dec[:, a:b])
            total = total + (part - x).pow(2).sum(-1).mean(-1)
        return total

    def _fused_decode(self, F: Tensor, wd: Tensor, offset: Tensor, x: Tensor, two_s: float, R: Tensor, E: Tensor,
                      G: Tensor, g_wdt: Tensor, first: bool, tmp_d: Optional[Tensor], sse: Tensor,
                      sum_diff: Tensor, prefix_sum: Tensor) -> Tensor:
        """Every prefix's error ``e_j`` (cumulative per-group decodes), the full one's SSE in
        ``sse`` and the others' in ``prefix_sum``; then, from the last group back, the suffix sum
        ``S_g = sum_{j >= g} e_j`` gives group g's ``G = 2 S_g W_dec[g]^T / B`` and
        ``dW_dec[g] = F[g]^T 2 S_g / B``; b_dec's error sum is ``S_1``'s."""
        groups = list(zip(self.bounds[:-1], self.bounds[1:]))
        errors, part = [], offset
        for a, b in groups:
            bmm(F[..., a:b], wd[:, a:b], R)
            part = part + R  # float32
            errors.append(part - x)
        diff = errors[-1]
        sse += diff.square().sum((1, 2))
        for e in errors[:-1]:
            prefix_sum += e.square().sum((1, 2))
        suffix = diff.clone()
        for g in range(len(groups) - 1, -1, -1):
            if g < len(groups) - 1:
                suffix += errors[g]
            a, b = groups[g]
            torch.mul(suffix, two_s, out=E)
            bmm(E, wd[:, a:b].transpose(1, 2), G[..., a:b])
            bmm_acc(g_wdt[..., a:b], E.transpose(1, 2), F[..., a:b], first, None if tmp_d is None else tmp_d[..., a:b])
        sum_diff += suffix.sum(1)
        threshold_backward(G, F, 0.0, grad_input=G)
        return diff

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        pre = self.pre_activations(x)
        f = self.codes(pre, train)
        if not train:
            return Step(f, x.new_zeros(self.n))
        return Step(f, x.new_zeros(self.n), {"prefix_sse": self.prefix_sse(x, f), "auxk": self.auxk_loss(x, pre, f)})
