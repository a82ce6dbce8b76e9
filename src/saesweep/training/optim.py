"""Adam and gradient clipping for stacked (packed) parameters, one learning rate per member.

``torch.optim.Adam`` takes one learning rate per parameter tensor; a pack stacks many SAEs in
one tensor, each with its own learning rate, so the update is written here. It is the same
arithmetic as ``torch.optim.Adam`` (no weight decay, no amsgrad), checked against it in the
tests, applied with a per-member step size.

Where PyTorch has its fused Adam kernel (``torch._fused_adam_``: CPU and CUDA, float32
parameters) the update is one pass over each member's tensors (one call per member, since a
call takes one learning rate); elsewhere it falls back to the same arithmetic in plain tensor
ops (nine passes). ``lr_scale`` multiplies the step of the named parameters (an architecture's
:attr:`~saesweep.saes.PackedSAE.lr_scale`).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


def _per_member(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class PackedAdam:
    def __init__(
        self,
        params: Iterable[tuple[str, nn.Parameter]],
        lr: Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_scale: Optional[dict[str, float]] = None,
    ) -> None:
        self.params = dict(params)
        self.lr_scale = {k: float(v) for k, v in (lr_scale or {}).items() if float(v) != 1.0}
        self.lr = lr.detach().clone().float()
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.use_fused = _fused_adam_available(self.params.values())

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        self.steps += 1
        if self.use_fused:
            self._fused_step(lr_factor)
            return
        bc1 = 1 - self.beta1**self.steps
        bc2_sqrt = math.sqrt(1 - self.beta2**self.steps)
        step_size = self.lr * (lr_factor / bc1)
        for k, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad
            m, v = self.exp_avg[k], self.exp_avg_sq[k]
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            size = step_size * self.lr_scale.get(k, 1.0)
            p.sub_(m.div(denom).mul_(_per_member(size.to(p.device), p)))

    def _fused_step(self, lr_factor: float) -> None:
        names = [k for k, p in self.params.items() if p.grad is not None]
        if not names:
            return
        dev = self.params[names[0]].device
        step = torch.tensor(float(self.steps), device=dev)  # the kernel reads it (already counted)
        groups: dict[float, list[str]] = {}
        for k in names:
            groups.setdefault(self.lr_scale.get(k, 1.0), []).append(k)
        for i, lr in enumerate((self.lr * lr_factor).tolist()):
            for scale, group in groups.items():
                torch._fused_adam_(
                    [self.params[k][i] for k in group],
                    [self.params[k].grad[i] for k in group],
                    [self.exp_avg[k][i] for k in group],
                    [self.exp_avg_sq[k][i] for k in group],
                    [],
                    [step] * len(group),
                    lr=lr * scale, beta1=self.beta1, beta2=self.beta2, weight_decay=0.0, eps=self.eps,
                    amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
                )

    def rebind(self, params: Iterable[tuple[str, nn.Parameter]], keep: Sequence[int]) -> None:
        """Follow a pack that dropped members: new parameter objects, state rows ``keep``."""
        idx = torch.tensor(list(keep), dtype=torch.long)
        self.params = dict(params)
        self.lr = self.lr.index_select(0, idx)
        for store in (self.exp_avg, self.exp_avg_sq):
            for k in list(store):
                store[k] = store[k].index_select(0, idx.to(store[k].device))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"adam.m.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"adam.v.{k}": v for k, v in self.exp_avg_sq.items()})
        out["adam.lr"] = self.lr
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], steps: int) -> None:
        self.steps = steps
        self.lr = tensors["adam.lr"].clone()
        for k in self.params:
            self.exp_avg[k] = tensors[f"adam.m.{k}"].to(self.params[k].device).clone()
            self.exp_avg_sq[k] = tensors[f"adam.v.{k}"].to(self.params[k].device).clone()


def _fused_adam_available(params) -> bool:
    params = list(params)
    return (
        hasattr(torch, "_fused_adam_")
        and bool(params)
        and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
        and len({p.device for p in params}) == 1
    )


@torch.no_grad()
def clip_grad_norm_per_member(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` applied to each member separately; returns the norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(torch.linalg.vector_norm(g.flatten(1), dim=1).square() for g in grads)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_member(coef, g))
    return norms
