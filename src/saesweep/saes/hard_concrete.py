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
from typing import Optional, Sequence

import torch
from torch import Tensor

from saesweep.saes.base import HyperParam, PackedSAE, Step
from saesweep.saes.kernels import (
    bmm,
    bmm_acc,
    chunks,
    draw_uniform,
    hardtanh_backward,
    threshold_backward,
)
from saesweep.saes.registry import register

GAMMA, ZETA, EPS = -0.1, 1.1, 1e-6
LOG_RATIO = math.log(-GAMMA / ZETA)  # log(-gamma / zeta) < 0
#: spread of the initial input-dependent gate logits over unit-mean-squared-norm inputs: gate
#: weights start as the decoder rows times GATE_INIT_STD * sqrt(d), so log_alpha's standard
#: deviation over inputs is about GATE_INIT_STD. Started as small as a ReLU encoder (about 0.01
#: here), every gate was open to the same degree for every input; the expected-L0 penalty
#: then closed most of them for good and kept a few always open (a dense code: L0 ~ 200 with
#: 79 % dead features on stories260K), since a gate's logit must vary with the input before it
#: can learn when to open.
GATE_INIT_STD = 2.0

#: a resampled feature's gate opens (log_alpha > 0) on this top fraction of the recent inputs,
#: ranked by their projection on its new decoder direction ...
RESAMPLE_OPEN_FRACTION = 0.05
#: ... and its logit rises by this much per standard deviation of that projection
RESAMPLE_GATE_SLOPE = 4.0

#: gate logits learn at GATE_LR_SCALE x lr (:attr:`PackedSAE.lr_scale`). A gate is shut below
#: log_alpha = -2.4 and decisive only several units beyond +-2.4, but Adam moves each weight
#: by about lr per step whatever its gradient: at lr 1e-3 over a default run (3,900 steps)
#: the logits barely left their start, the gates stayed half-open and noisy, and features died
#: in droves. The scale that fixes it was chosen on real activations (benchmarks/README.md,
#: "gate learning rate").
GATE_LR_SCALE = 30.0


def selective_gate(xc: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
    """``(slope, cut)`` per new feature (``dirs`` ``[k, d]``, unit) for a gate logit
    ``slope * (x . dir - cut)`` that is positive on the top RESAMPLE_OPEN_FRACTION of the recent
    centred inputs ``xc`` along the direction and rises RESAMPLE_GATE_SLOPE per standard deviation."""
    proj = torch.matmul(xc, dirs.T)  # [N, k]
    sample = proj[:: max(1, proj.shape[0] // 8192)]
    cut = torch.quantile(sample, 1 - RESAMPLE_OPEN_FRACTION, dim=0)
    return RESAMPLE_GATE_SLOPE / sample.std(0).clamp_min(1e-6), cut


def resampled_share(n_new: int) -> float:
    """The factor on the magnitudes of ``n_new`` features resampled together: each opens on
    :data:`RESAMPLE_OPEN_FRACTION` of the inputs, so about ``k = n_new * RESAMPLE_OPEN_FRACTION``
    of them are open on a token, and at full size (the input's projection on each, along
    directions drawn from the same few high-error inputs) their sum overshoots the input many
    times over when most features are resampled at once (a sparse member with most features
    dead). ``1 / sqrt(k)``, not ``1 / k``: magnitudes that small could not grow back within a
    short run (measured in benchmarks/README.md, "Hard concrete at the sparse end")."""
    return max(1.0, n_new * RESAMPLE_OPEN_FRACTION) ** -0.5


BETA_PARAMS = {
    "initial_beta": HyperParam(float, 0.5, "hard-concrete temperature at the start of training"),
    "final_beta": HyperParam(
        float, None, "if set, beta anneals exponentially to this value by the end", optional=True
    ),
}


def beta_at(initial: Tensor, final: Tensor, progress: float) -> Tensor:
    """Per-member temperature at ``progress`` in [0, 1]; ``final`` holds ``initial`` where unset."""
    return initial * (final / initial) ** progress


def _streams(g) -> Sequence[torch.Generator]:
    return [g] if isinstance(g, torch.Generator) else g


def sample_gates(log_alpha: Tensor, beta: Tensor, generators: Sequence) -> Tensor:
    """Stochastic training gates ``z`` (shape of ``log_alpha``, ``[n, B, m]``); ``generators[i]``
    is member i's noise: a generator or a list of streams (see :func:`.kernels.draw_uniform`)."""
    n = log_alpha.shape[0]
    u = torch.empty(log_alpha.shape, device=log_alpha.device)
    draw_uniform(list(u), [_streams(generators[i]) for i in range(n)])
    u.mul_(1 - 2 * EPS).add_(EPS)
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


def fused_gates(U: Tensor, Z: Tensor, log_alpha: Tensor, inv_beta: Tensor, streams: Sequence, row0: int) -> None:
    """Training gates of a chunk (batch rows ``row0 ..``), in place: ``U`` (float32 ``[k, t, m]``)
    ends as s, ``Z`` as z.

    ``u`` is drawn from each member's noise streams exactly as :func:`sample_gates` draws it for
    the same rows, then mapped to (eps, 1 - eps); ``log u - log(1 - u)`` is computed as
    ``logit(u)`` (one pass).
    """
    draw_uniform(list(U), [_streams(g) for g in streams], row0)
    torch.add(U.new_tensor(EPS), U, alpha=1 - 2 * EPS, out=U)
    U.logit_().add_(log_alpha).mul_(inv_beta).sigmoid_()
    torch.add(U.new_tensor(GAMMA), U, alpha=ZETA - GAMMA, out=Z).clamp_(0.0, 1.0)


def fused_gate_backward(G: Tensor, U: Tensor, Z: Tensor, slope: Tensor) -> None:
    """``G`` (dL/dz) becomes dL/dlog_alpha through the sampled gate; ``U`` (s) is overwritten.

    dz/ds = (zeta - gamma) where the clamp is inactive; ds/dlog_alpha = s (1 - s) / beta;
    ``slope`` = (zeta - gamma) / beta per member.
    """
    hardtanh_backward(G, Z, 0.0, 1.0, grad_input=G)
    U.addcmul_(U, U, value=-1.0)
    G.mul_(U).mul_(slope)


def fused_penalty(G: Tensor, U: Tensor, log_alpha: Tensor, beta: Tensor, kappa: Tensor) -> Tensor:
    """Adds kappa * dp/dlog_alpha to ``G`` with p = sigmoid(log_alpha - beta log(-gamma/zeta));
    returns sum p per member (``U`` is used as scratch)."""
    torch.sub(log_alpha, (beta * LOG_RATIO)[:, None, None], out=U).sigmoid_()
    total = U.sum((1, 2))
    U.addcmul_(U, U, value=-1.0)
    G.addcmul_(U, kappa[:, None, None])
    return total


class HardConcreteGates:
    """Mixin: the beta buffers and schedule shared by both hard-concrete architectures.

    ``penalty_scale``: the expected-L0 penalty counts features (each open gate costs its
    weight per token) while the SSE of a unit-norm input is at most about 1, so a count needs a
    much smaller weight than an L1 of magnitudes: 0.1 maps the classic coefficients 0.01-0.3
    onto 1e-3-3e-2, dense to sparse on real activations (benchmarks/README.md).
    """

    penalty_scale = 0.1
    #: resampling continues to 80 % of training (not the 50 % of the other types): a resampled
    #: hard-concrete feature that the count penalty closes again stays dead, and features kept
    #: dying after the last check. On stories260K (ratio 16, 1.9M tokens) at c = 0.1 / 0.3,
    #: 0.5 -> 0.8 took gated hard concrete from L0 6.5 / 4.9, FVU 0.35 / 0.38, dead 44 / 41 % to
    #: L0 31.5 / 25.2, FVU 0.18 / 0.22, dead 9 / 12 %, and hard concrete's dead 36 / 54 % to 25 / 39 %.
    #: With the gate logits' learning rate (GATE_LR_SCALE 10), 0.5 still left hard concrete 5-11 %
    #: dead at c = 0.01-0.3, 0.8 left 1-2 % (c = 0.1 / 0.3).
    resample_until = 0.8

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
    classic, order = True, 1
    grid = {"initial_beta": [0.1, 0.5, 1.0], "input_dependent_gates": [True, False]}
    saelens_architecture = "hard_concrete"
    #: target_l0 starts at the dense end of the useful range: coming from above, the count
    #: penalty closes gates faster than the L0 shows it, and closed gates train poorly after
    initial_coeff = 0.01
    encoder_weights = ("W_gate", "W_mag")
    #: input-dependent gates only: shared logits (input_dependent_gates false) keep lr, since at
    #: 30x every one of them shut (stories260K, c = 0.1 / 0.3: 100 % dead; at 1x L0 476, FVU 0.9)
    lr_scale = {"W_gate": GATE_LR_SCALE, "b_gate": GATE_LR_SCALE}
    revision = 2  # 1: the gate logits' learning rate (GATE_LR_SCALE); 2: resampled magnitudes shared
    fused = True
    # memory hint: 8 wide tensors measured at the training peak, plus slack (see PackedSAE)
    train_wide, eval_wide = 15, 8
    fused_wide = 20  # measured as train_wide is, for the CPU's fused step
    hyperparams = {
        **BETA_PARAMS,
        "input_dependent_gates": HyperParam(
            bool, True, "gate logits depend on the input (else one learned logit per feature)", per_member=False
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
            with torch.no_grad():
                self.W_gate.copy_(self.W_dec.transpose(1, 2) * self.gate_init_scale(GATE_INIT_STD))
        else:
            self._init_decoder_and_encoder("W_mag")
        self._param("b_mag", self._zeros(self.d_sae))
        # shared logits start at 0 (P(open) ~ sigmoid(2.4 beta)); input-dependent ones
        # start with the gate bias at 0 as well
        self._param("b_gate" if self.input_dependent else "log_alpha", self._zeros(self.d_sae))

    def reinit_features(self, row: int, idx: Tensor, dirs: Tensor, window: Tensor) -> None:
        """A selective gate and a full-size magnitude for each resampled feature.

        The generic start (gate bias 0, encoder columns at 0.2x) opens the new gate on every
        token while its magnitude is tiny: the expected-L0 penalty then costs the feature a
        whole count per token for almost no reconstruction, closes it within a few hundred
        steps, and it is dead at the next check (stories260K, c = 0.1: 86 % of the features
        dead at the end). Here the gate opens only on the top :data:`RESAMPLE_OPEN_FRACTION` of
        the recent inputs along the new direction (the ones it can help), and the magnitude is
        the input's projection on it (a unit decoder row), so what the feature adds is worth
        its cost from the first step (measured: 24 % dead at c = 0.1, FVU 0.222 -> 0.18),
        scaled by :func:`resampled_share` when many features are resampled together.
        """
        if not self.input_dependent:
            return
        slope, open_at = selective_gate(window - self.b_dec[row], dirs)
        self.W_gate.data[row][:, idx] = dirs.T * slope
        self.b_gate.data[row, idx] = -slope * open_at
        self.W_mag.data[row][:, idx] = dirs.T * resampled_share(idx.numel())

    def log_alpha_of(self, xc: Tensor) -> Tensor:
        if self.input_dependent:
            return torch.matmul(xc, self.W_gate) + self.b_gate[:, None, :]
        return self.log_alpha[:, None, :].expand(self.n, xc.shape[1], self.d_sae)

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        xc = self.centered(x)
        beta = self.beta(progress)
        log_alpha = self.log_alpha_of(xc)
        f_mag = torch.relu(torch.matmul(xc, self.W_mag) + self.b_mag[:, None, :])
        z = gates(log_alpha, beta, self.noise, train)
        return Step(z * f_mag, expected_l0(log_alpha, beta))

    def saelens_extra_cfg(self, i: int) -> dict:
        return {**super().saelens_extra_cfg(i), "input_dependent_gates": self.input_dependent}

    def _fused_rows(self, x, rows, chunk: Optional[int], cdt, progress, sparsity_scale, stats, out) -> None:
        """With e = 2 (x_hat - x) / B: g_f = e W_dec^T; g_mag = 1[f_mag > 0] z g_f;
        g_z = f_mag g_f; g_logalpha = g_z dz/dlog_alpha + kappa p (1 - p). Input-dependent gate
        and magnitude encoders are one product with [W_gate | W_mag] (and one for their
        gradients); shared logits sum their gradient over tokens."""
        k = rows.stop - rows.start
        B, d = x.shape
        m, f32 = self.d_sae, torch.float32
        dep = self.input_dependent
        W_mag, b_mag, W_dec, b_dec = (p.detach()[rows] for p in (self.W_mag, self.b_mag, self.W_dec, self.b_dec))
        xa = self._centered_ones(x, b_dec, cdt)
        if dep:
            W_gate, b_gate = self.W_gate.detach()[rows], self.b_gate.detach()[rows]
            width = 2 * m
            wcat = self._ws("Wcat", (k, d + 1, width), cdt)
            wcat[:, :d, :m].copy_(W_gate)
            wcat[:, d, :m].copy_(b_gate)
            wcat[:, :d, m:].copy_(W_mag)
            wcat[:, d, m:].copy_(b_mag)
        else:
            width = m
            wcat = self._weight_with_bias("Wcat", W_mag, b_mag, cdt)
            shared = self.log_alpha.detach()[rows]
        wda = self._decoder_with_ones(W_dec, cdt)
        wdt = wda.transpose(1, 2)[:, :d]
        beta = self.beta(progress)[rows]
        inv_beta, slope = (1 / beta)[:, None, None], ((ZETA - GAMMA) / beta)[:, None, None]
        two_s, kappa = self._step_scales(rows, B, sparsity_scale)
        T = chunk or B
        o = self._ws("o", (k, T, width), cdt)  # [log_alpha | mag pre-activation], then f_mag
        go = self._ws("go", (k, T, width), cdt)  # [dL/dlog_alpha | dL/dmag]
        gl = go if dep else self._ws("gl", (k, T, m), cdt)
        u = self._ws("u", (k, T, m), f32)
        z = self._ws("z", (k, T, m), cdt)
        f = self._ws("f", (k, T, m), cdt)
        r = self._ws("r", (k, T, d + 1), cdt)
        e = self._ws("e", (k, T, d), cdt)
        g_wcat, g_wdt, tmp_e, tmp_d = self._grad_accumulators(k, d, width, cdt)
        sse, penalty, nnz = (x.new_zeros(k) for _ in range(3))
        sum_diff = x.new_zeros(k, d)
        g_shared = x.new_zeros(k, m)
        gens = self.noise[rows]
        offset = b_dec[:, None, :]
        for i, (s0, s1) in enumerate(chunks(B, chunk)):
            t = s1 - s0
            O, GO, U, Z, F, R, E = (b[:, :t] for b in (o, go, u, z, f, r, e))
            if dep:
                LA, FM, GL, GM = O[..., :m], O[..., m:], GO[..., :m], GO[..., m:]
            else:
                LA, FM, GL, GM = shared[:, None, :], O, gl[:, :t], GO
            xs = xa[:, s0:s1]
            bmm(xs, wcat, O)
            FM.clamp_min_(0)
            fused_gates(U, Z, LA, inv_beta, gens, s0)
            torch.mul(Z, FM, out=F)
            bmm(F, wda, R)
            diff = torch.add(R[..., :d], offset).sub_(x[s0:s1])
            sse += diff.square().sum((1, 2))
            sum_diff += diff.sum(1)
            torch.mul(diff, two_s, out=E)
            bmm(E, wdt, GM)  # g_f
            torch.mul(GM, FM, out=GL)  # g_z
            GM.mul_(Z)
            threshold_backward(GM, FM, 0.0, grad_input=GM)  # g_mag
            fused_gate_backward(GL, U, Z, slope)
            if dep:
                penalty += fused_penalty(GL, U, LA, beta, kappa)
            else:
                g_shared += GL.sum(1, dtype=f32)
            if stats:
                nnz += torch.count_nonzero(F, dim=(1, 2))
            bmm_acc(g_wcat, xs.transpose(1, 2), GO, i == 0, tmp_e)
            bmm_acc(g_wdt, E.transpose(1, 2), F, i == 0, tmp_d)
        g_bdec = sum_diff.mul_(two_s)
        if dep:
            self.W_gate.grad[rows].copy_(g_wcat[:, :d, :m])
            self.b_gate.grad[rows].copy_(g_wcat[:, d, :m])
            self.W_mag.grad[rows].copy_(g_wcat[:, :d, m:])
            self.b_mag.grad[rows].copy_(g_wcat[:, d, m:])
            g_bdec -= torch.bmm(W_gate, g_wcat[:, d, :m, None])[..., 0]
        else:
            p = torch.sigmoid(shared - (beta * LOG_RATIO)[:, None])
            penalty = p.sum(-1) * B
            scale = self.penalty_weight(sparsity_scale)[rows]
            self.log_alpha.grad[rows].copy_(g_shared.addcmul_(p * (1 - p), scale[:, None]))
            self.W_mag.grad[rows].copy_(g_wcat[:, :d])
            self.b_mag.grad[rows].copy_(g_wcat[:, d])
        g_bdec -= torch.bmm(W_mag, self.b_mag.grad[rows][..., None])[..., 0]
        self.b_dec.grad[rows].copy_(g_bdec)
        self.W_dec.grad[rows].copy_(g_wdt.transpose(1, 2))
        self._write_stats(out, B, d, sse, penalty, nnz)
