"""Steer each member's sparsity coefficient until its L0 is on a target (``target_l0``).

The coefficient-driven architectures (ReLU, Gated, the hard-concrete types, JumpReLU) reach an
L0 that depends on their coefficient, their data and their width in ways no fixed default gets
right. With ``target_l0`` the trainer sets the coefficient itself:

* every :data:`EVERY` steps it measures each member's L0 on the current training batch, with the
  codes evaluation uses (``encode(train=False)``: the hard-concrete types' noisy training gates
  would otherwise count differently from what a user measures), and keeps an exponential moving
  average of ``log L0``;
* it moves ``log c`` by a PI step on the error ``e = log(L0_ema / target)``:
  ``dlog c = lr_factor * (KI * e + KP * (e - e_prev))``, each step at most :data:`MAX_STEP`.
  The L0 follows a new coefficient only as fast as the optimiser moves the encoder, so the gain
  is scaled by the learning-rate schedule's factor: the loop keeps its damping while the
  learning rate decays;
* it starts when the sparsity warm-up ends and stops for the final ``train.target_l0_hold_frac``
  of training, which runs with the coefficient it reached: the SAE finishes under one
  stationary objective, like an SAE trained at that coefficient from the start.

Each member has its own target and trajectory (the coefficient is already one value per member,
so the fused steps need nothing new); members without a target keep their fixed coefficient.
The controller's state goes into checkpoints with the rest of the training state.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

#: steps between two measurements (each one is an extra encoder pass over at most MAX_TOKENS)
EVERY = 5
MAX_TOKENS = 1024
#: integral and proportional gains of the PI step on log c, per measurement
KI = 0.3
KP = 0.6
#: the most ``log c`` moves in one measurement
MAX_STEP = 0.25
#: weight of a new measurement in the moving average of log L0
EMA = 0.3
#: the coefficient stays within these bounds (an architecture whose L0 stops answering to its
#: coefficient must not drive it to zero or to overflow)
MIN_COEFF, MAX_COEFF = 1e-6, 1e3
#: L0 below this counts as this (log 0 is not an error the loop can use)
MIN_L0 = 0.05


class L0Controller:
    """The coefficient controller of a pack; ``targets[i]`` is member i's ``target_l0`` (None:
    a fixed coefficient)."""

    def __init__(self, targets: Sequence[Optional[float]], total_steps: int, warmup_frac: float,
                 hold_frac: float, device: torch.device) -> None:
        self.log_target = torch.tensor([math.log(t) if t else math.nan for t in targets], device=device)
        self.steered = ~torch.isnan(self.log_target)
        self.ema = torch.full_like(self.log_target, math.nan)
        self.prev_err = torch.zeros_like(self.log_target)
        self.start = int(round(warmup_frac * total_steps))
        self.stop = int(round((1.0 - hold_frac) * total_steps))

    @classmethod
    def for_pack(cls, configs, total_steps: int, device: torch.device) -> Optional["L0Controller"]:
        """The controller of a pack whose members steer their coefficient; None when none does."""
        if not any(c.steers_coeff for c in configs):
            return None
        tc = next(c for c in configs if c.steers_coeff).train  # a pack shares its hold fraction
        return cls([c.target_l0 if c.steers_coeff else None for c in configs], total_steps,
                   tc.sparsity_warmup_frac, tc.target_l0_hold_frac, device)

    def due(self, step: int) -> bool:
        return self.start <= step < self.stop and (step - self.start) % EVERY == 0

    @torch.no_grad()
    def measure(self, sae, x: Tensor) -> Tensor:
        """Each member's L0 on ``x`` (at most MAX_TOKENS of it) with its evaluation codes: ``[n]``."""
        f = sae.encode(x[:MAX_TOKENS].float(), train=False)
        return (f != 0).float().sum(-1).mean(-1)

    @torch.no_grad()
    def update(self, coeff: Tensor, l0: Tensor, lr_factor: float) -> None:
        """One PI step on ``coeff`` (the SAE's per-member ``sparsity_coeff``, in place) from the
        measured ``l0``."""
        log_l0 = l0.float().clamp_min(MIN_L0).log()
        first = torch.isnan(self.ema)
        self.ema = torch.where(first, log_l0, self.ema + EMA * (log_l0 - self.ema))
        err = self.ema - self.log_target
        step = lr_factor * (KI * err + KP * torch.where(first, torch.zeros_like(err), err - self.prev_err))
        step = step.clamp(-MAX_STEP, MAX_STEP)
        self.prev_err = err
        new = (coeff * torch.exp(step)).clamp(MIN_COEFF, MAX_COEFF)
        coeff.copy_(torch.where(self.steered, new, coeff))

    def l0_ema(self) -> list[Optional[float]]:
        """Each member's moving-average L0 (None before the first measurement, or without a target)."""
        return [None if not s or math.isnan(v) else math.exp(v)
                for s, v in zip(self.steered.tolist(), self.ema.tolist())]

    # ------------------------------------------------------------ pack changes, checkpoints
    def select(self, keep: Sequence[int]) -> None:
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.log_target.device)
        for name in ("log_target", "steered", "ema", "prev_err"):
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def state_tensors(self) -> dict[str, Tensor]:
        return {"l0_control.ema": self.ema.clone(), "l0_control.prev_err": self.prev_err.clone()}

    def load_state_tensors(self, tensors: dict[str, Tensor], rows: Sequence[int]) -> None:
        """Restore the moving average of the saved pack's ``rows`` (the members resumed here)."""
        if "l0_control.ema" not in tensors:
            return
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.ema.device)
        self.ema = tensors["l0_control.ema"].to(self.ema).index_select(0, idx)
        self.prev_err = tensors["l0_control.prev_err"].to(self.ema).index_select(0, idx)
