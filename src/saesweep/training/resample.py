"""Dead-feature resampling (Anthropic's "Towards Monosemanticity" method, as dictionary_learning
does it), per member of a pack.

Every ``train.resample_every`` of the training steps, up to ``train.resample_until`` of them,
each member's features are checked on the most recent training activations (a window of up to
:data:`WINDOW_TOKENS` tokens, evaluation-mode codes). A feature that fired on none of them is
*dead* and gets re-initialised towards inputs the member reconstructs badly:

* inputs are drawn with probability proportional to the member's squared reconstruction error;
* the feature's decoder row becomes the unit direction of the drawn input (minus b_dec);
* each encoder weight's column (``encoder_weights``: W_enc, or W_gate and W_mag) becomes that
  direction times 0.2 times the mean norm of the living features' columns;
* its per-feature parameters (b_enc, b_gate, b_mag, r_mag, shared gate logits) are reset to 0;
* its Adam moments are zeroed;
* the architecture may then adjust the start (:meth:`PackedSAE.reinit_features`: the
  hard-concrete SAE gives its gates a selective opening and its magnitudes full size).

It works on parameters between optimiser steps, so it is the same for the fused and the
autograd step, and it touches only the member whose features died. Draws use the member's own
generator, so a resumed run resamples exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch import Tensor

from saesweep.saes import PackedSAE
from saesweep.training.optim import PackedAdam

#: activations a dead-feature check looks at (the most recent training batches)
WINDOW_TOKENS = 65_536
#: encoder columns of resampled features are this fraction of the living features' mean norm
ENCODER_NORM_FRACTION = 0.2


class Resampler:
    """Keeps the recent training batches and resamples dead features on schedule."""

    def __init__(self, total_steps: int, every: float, until: float, batch_size: int) -> None:
        self.interval = max(1, round(every * total_steps)) if every > 0 else 0
        self.last = int(until * total_steps)
        self.window: deque[Tensor] = deque(maxlen=max(1, -(-WINDOW_TOKENS // batch_size)))

    def observe(self, x: Tensor) -> None:
        self.window.append(x)

    def due(self, step: int) -> bool:
        """Whether to check after optimiser step ``step`` (0-based)."""
        s = step + 1
        return self.interval > 0 and s % self.interval == 0 and s <= self.last

    @torch.no_grad()
    def __call__(self, sae: PackedSAE, opt: PackedAdam) -> list[int]:
        """Resample every member's dead features; returns how many per member (row order)."""
        x = torch.cat(list(self.window))
        return [resample_member(sae, opt, row, x) for row in range(sae.n)]


@torch.no_grad()
def dead_features(view: PackedSAE, x: Tensor, chunk: int = 8192) -> tuple[Tensor, Optional[Tensor]]:
    """``(dead [m] bool, squared error per token [N])`` of a one-member view on ``x``; the error
    is None when no feature is dead, and the check stops as soon as every feature has fired
    (a dense member's check costs one chunk: checks were 48 % of a 400K-token seed pack's
    training time when every one read the whole window)."""
    fired = torch.zeros(view.d_sae, dtype=torch.bool, device=x.device)
    err = torch.empty(x.shape[0], device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        f = view.encode(xs, train=False)[0]
        fired |= (f != 0).any(0)
        if bool(fired.all()):
            return ~fired, None
        err[s : s + chunk] = (view.decode(f[None])[0] - xs).pow(2).sum(-1)
    return ~fired, err


@torch.no_grad()
def resample_member(sae: PackedSAE, opt: Optional[PackedAdam], row: int, x: Tensor) -> int:
    """Resample member ``row``'s features that never fire on ``x``; returns how many."""
    dead, err = dead_features(sae.member(row), x)
    idx = dead.nonzero()[:, 0]
    if err is None or idx.numel() == 0 or idx.numel() == sae.d_sae:
        return 0
    weights = err.clamp_min(0).double()
    if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
        return 0
    pick = torch.multinomial(weights, idx.numel(), replacement=True, generator=sae.generators[row])
    dirs = x[pick] - sae.b_dec[row]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    for name, p in sae.named_parameters(recurse=False):
        if name == "W_dec":
            p[row, idx] = dirs.to(p.dtype)
        elif name in sae.encoder_weights:
            norm = p[row][:, alive].norm(dim=0).mean()
            p[row][:, idx] = (dirs.T * (ENCODER_NORM_FRACTION * norm)).to(p.dtype)
        elif p.dim() == 2 and name != "b_dec":  # a per-feature vector [n, m]
            p[row, idx] = 0
        else:
            continue
        if opt is not None:
            for state in (opt.exp_avg, opt.exp_avg_sq):
                s = state[name]
                if name in sae.encoder_weights:
                    s[row][:, idx] = 0
                else:
                    s[row, idx] = 0
    sae.reinit_features(row, idx, dirs, x)
    return int(idx.numel())
