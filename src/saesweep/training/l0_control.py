"""Steer each member's sparsity coefficient until its L0 is on a target (``target_l0``).

The coefficient-driven architectures (ReLU, Gated, the hard-concrete types, JumpReLU) reach an
L0 that depends on their coefficient, their data and their width in ways no fixed default gets
right. With ``target_l0`` the trainer sets the coefficient itself:

* every :data:`EVERY` steps it measures each member's L0 on the current training batch, with the
  codes evaluation uses (``encode(train=False)``: the hard-concrete types' noisy training gates
  would otherwise count differently from what a user measures), and keeps an exponential moving
  average of ``log L0``;
* by the architecture's ``l0_rule``, either

  - ``pi`` (ReLU, Gated, hard concrete): it moves ``log c`` by a PI step on the error
    ``e = log(L0_ema / target)``: ``dlog c = gain * sqrt(lr_factor) * (KI * e + KP * (e - e_prev))``,
    each step at most :data:`MAX_STEP`. The L0 follows a new coefficient only some tens of steps
    later (the optimiser has to move the encoder), and early in training it falls from the dense
    start whatever the coefficient: a loop that pushed on through that lag would wind the
    coefficient far past its goal and collapse the codes, which a short run never recovers from.
    So the step is skipped while the L0 is already moving towards the target fast enough to
    reach it before the loop stops (its trend, a moving average of the change of ``L0_ema`` per
    measurement, projected over the measurements left). The gain follows the square root of the
    learning-rate schedule's factor: the loop keeps its damping while the learning rate decays
    and can still finish the approach in a short run. The loop stops for the final
    ``train.target_l0_hold_frac`` of training, which runs with the coefficient it reached: the SAE
    finishes under one stationary objective, like an SAE trained at that coefficient from the start;
  - ``quadratic`` (JumpReLU, gated hard concrete): the coefficient is the gradient factor of the
    penalty ``c0 * target * (L0 / target - 1)^2`` (``c0`` = ``initial_coeff``), as SAELens's
    target-L0 penalty for JumpReLU: ``c = c0 * 2 (L0 / target - 1)``, the factor kept within
    ``[QUAD_LOW, QUAD_HIGH]``. Below the target it is negative and reopens latents, which
    these architectures need: a JumpReLU threshold pushed past all its inputs, or a gate the
    penalty closed, gets no gradient back from a smaller positive coefficient, and the gated
    hard-concrete SAE's auxiliary term alone holds it sparser than many targets. The rule keeps
    no state (an integral of the error would wind up while these codes lag the coefficient, and
    tip the SAE into a dense mode it does not leave), so the L0 settles a little off the target,
    on the side the reconstruction pulls; the objective is stationary, so it runs to the end;

* it starts when the sparsity warm-up ends.

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
#: weight of a new change of ``L0_ema`` in its trend (the speed the L0 approaches the target at)
TREND = 0.5
#: the most ``log c`` moves in one measurement
MAX_STEP = 0.25
#: weight of a new measurement in the moving average of log L0
EMA = 0.3
#: the coefficient stays within these bounds (an architecture whose L0 stops answering to its
#: coefficient must not drive it to zero or to overflow)
MIN_COEFF, MAX_COEFF = 1e-6, 1e3
#: the rules: ``pi`` steers log c; ``quadratic`` sets c = stiffness * 2 (L0 / target - 1) (see
#: :meth:`L0Controller.update`)
RULES = ("pi", "quadratic")
#: the quadratic rule's factor 2 (L0 / target - 1) is kept within these bounds: below the target
#: the coefficient turns negative and reopens latents, far above it the push stops growing
QUAD_LOW, QUAD_HIGH = -0.25, 2.0
#: L0 below this counts as this (log 0 is not an error the loop can use)
MIN_L0 = 0.05


class L0Controller:
    """The coefficient controller of a pack; ``targets[i]`` is member i's ``target_l0`` (None:
    a fixed coefficient)."""

    def __init__(self, targets: Sequence[Optional[float]], total_steps: int, warmup_frac: float,
                 hold_frac: float, device: torch.device, gain: float = 1.0, rule: str = "pi",
                 stiffness: Optional[Sequence[float]] = None) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown L0 control rule {rule!r}; known: {', '.join(RULES)}")
        self.gain, self.rule = gain, rule
        self.log_target = torch.tensor([math.log(t) if t else math.nan for t in targets], device=device)
        self.steered = ~torch.isnan(self.log_target)
        self.ema = torch.full_like(self.log_target, math.nan)
        self.prev_err = torch.zeros_like(self.log_target)
        self.trend = torch.zeros_like(self.log_target)
        self.stiffness = torch.tensor(list(stiffness) if stiffness is not None else [1.0] * len(targets),
                                      device=device, dtype=torch.float32)
        self.start = int(round(warmup_frac * total_steps))
        # the quadratic rule's objective is stationary by itself: it needs no hold
        self.stop = total_steps if rule == "quadratic" else int(round((1.0 - hold_frac) * total_steps))

    @classmethod
    def for_pack(cls, configs, total_steps: int, device: torch.device, arch=None) -> Optional["L0Controller"]:
        """The controller of a pack whose members steer their coefficient; None when none does.
        ``arch`` (the SAE class) gives the rule, the gain and the default starting coefficient."""
        if not any(c.steers_coeff for c in configs):
            return None
        tc = next(c for c in configs if c.steers_coeff).train  # a pack shares its hold fraction
        gain, rule, default = ((arch.l0_gain, arch.l0_rule, arch.initial_coeff) if arch is not None
                               else (1.0, "pi", 0.1))
        stiffness = [c.initial_coeff or default for c in configs]
        return cls([c.target_l0 if c.steers_coeff else None for c in configs], total_steps,
                   tc.sparsity_warmup_frac, tc.target_l0_hold_frac, device, gain, rule, stiffness)

    def due(self, step: int) -> bool:
        return self.start <= step < self.stop and (step - self.start) % EVERY == 0

    @torch.no_grad()
    def measure(self, sae, x: Tensor) -> Tensor:
        """Each member's L0 on ``x`` (at most MAX_TOKENS of it) with its evaluation codes: ``[n]``."""
        f = sae.encode(x[:MAX_TOKENS].float(), train=False)
        return (f != 0).float().sum(-1).mean(-1)

    @torch.no_grad()
    def update(self, coeff: Tensor, l0: Tensor, lr_factor: float, step: int) -> None:
        """One control step on ``coeff`` (the SAE's per-member ``sparsity_coeff``, in place) from
        the ``l0`` measured at training step ``step``."""
        log_l0 = l0.float().clamp_min(MIN_L0).log()
        first = torch.isnan(self.ema)
        ema = torch.where(first, log_l0, self.ema + EMA * (log_l0 - self.ema))
        moved = torch.where(first, torch.zeros_like(ema), ema - self.ema)
        self.trend = torch.where(first, moved, self.trend + TREND * (moved - self.trend))
        self.ema = ema
        if self.rule == "quadratic":
            pull = (2 * ((log_l0 - self.log_target).exp() - 1)).clamp(QUAD_LOW, QUAD_HIGH)
            new = self.stiffness * pull
            coeff.copy_(torch.where(self.steered, new, coeff))
            return
        err = self.ema - self.log_target
        change = torch.where(first, torch.zeros_like(err), err - self.prev_err)
        move = (self.gain * math.sqrt(max(lr_factor, 0.0)) * (KI * err + KP * change)).clamp(-MAX_STEP, MAX_STEP)
        # the codes are on their way: the L0 reaches the target before the loop stops
        left = max(1.0, (self.stop - step) / EVERY)
        arriving = (err * self.trend < 0) & (err.abs() < self.trend.abs() * left)
        move = torch.where(arriving, torch.zeros_like(move), move)
        self.prev_err = err
        new = (coeff * torch.exp(move)).clamp(MIN_COEFF, MAX_COEFF)
        coeff.copy_(torch.where(self.steered, new, coeff))

    # ------------------------------------------------------------ pack changes, checkpoints
    def select(self, keep: Sequence[int]) -> None:
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.log_target.device)
        for name in ("log_target", "steered", "ema", "prev_err", "trend", "stiffness"):
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def state_tensors(self) -> dict[str, Tensor]:
        return {"l0_control.ema": self.ema.clone(), "l0_control.prev_err": self.prev_err.clone(),
                "l0_control.trend": self.trend.clone()}

    def load_state_tensors(self, tensors: dict[str, Tensor], rows: Sequence[int]) -> None:
        """Restore the moving average of the saved pack's ``rows`` (the members resumed here)."""
        if "l0_control.ema" not in tensors:
            return
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.ema.device)
        self.ema = tensors["l0_control.ema"].to(self.ema).index_select(0, idx)
        self.prev_err = tensors["l0_control.prev_err"].to(self.ema).index_select(0, idx)
        if "l0_control.trend" in tensors:
            self.trend = tensors["l0_control.trend"].to(self.ema).index_select(0, idx)
