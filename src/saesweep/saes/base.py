"""What every SAE architecture shares.

An SAE module here holds ``n`` SAEs of one architecture and one shape (a *pack*): every
parameter has a leading member axis, so ``W_enc`` is ``[n, d_in, d_sae]``. A single SAE is
a pack of one, which keeps one code path for plain runs and packed sweeps. Members never
interact: each has its own parameters, hyperparameters, random generator and loss, and the
total loss is the plain sum of the members' losses, so each member's gradient is exactly the
gradient of its own loss.

Parameter names and layouts follow SAELens (``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` is
``[d_sae, d_in]``, ``b_dec`` is subtracted from the input) so that exported weights load
there unchanged. Decoder rows (the "columns" of W_dec as a map R^m -> R^d) are kept
at unit norm by :meth:`PackedSAE.normalize_decoder` after every optimiser step.

Two implementations of a training step compute the same numbers: :meth:`PackedSAE.losses`
(the math as written, differentiated by autograd: the reference, and the
fallback for an architecture that brings no fused step) and :meth:`PackedSAE._fused_rows`
(hand-written gradients, see :mod:`.kernels`), which the trainer uses through
:meth:`PackedSAE.train_step`. tests/saes/test_fused.py checks that they agree for every
architecture, in loop and stacked mode, chunked or not, fp32 and bf16.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from saesweep.saes.kernels import StepPlan, Workspace, compute_dtype, noise_streams
from saesweep.saes.registry import HyperParam


@dataclass
class Step:
    """What an architecture's forward pass gives the loss: its codes and its loss terms.

    The loss of every member is ``SSE + sparsity_coeff * penalty_scale * penalty + sum(aux)``
    (LOSS_CONVENTION); each auxiliary term is named (the architecture lists the names in
    ``aux_terms``) so that the training log and W&B show it by name."""

    codes: Tensor  #: ``[n, B, d_sae]``
    penalty: Tensor  #: ``[n]``: P per token, summed over features, before its coefficient
    aux: dict[str, Tensor] = field(default_factory=dict)  #: name -> ``[n]``, weighted, per token


@dataclass
class Losses:
    """Per-member loss terms of one step, each a tensor of shape ``[n]``."""

    total: Tensor
    mse: Tensor
    sparsity: Tensor  # the penalty P (per token, summed over features), before its coefficient
    aux: Tensor  # the sum of the named auxiliary terms
    l0: Optional[Tensor]  # mean number of non-zero codes per token (training codes); None when not asked
    terms: dict[str, Tensor] = field(default_factory=dict)  # the auxiliary terms by name

    def detached(self) -> "Losses":
        return self.map(lambda t: t.detach())

    def map(self, fn) -> "Losses":
        """A copy with ``fn`` applied to every tensor (the per-member selection, detaching)."""
        return Losses(total=fn(self.total), mse=fn(self.mse), sparsity=fn(self.sparsity), aux=fn(self.aux),
                      l0=None if self.l0 is None else fn(self.l0), terms={k: fn(v) for k, v in self.terms.items()})


def mse_per_member(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over tokens and dimensions of (x - x_hat)^2; x is ``[B, d]``, x_hat ``[n, B, d]``."""
    return (x_hat - x).pow(2).mean(dim=(-2, -1))


class PackedSAE(nn.Module):
    """Base class: ``n`` SAEs with stacked parameters. Subclasses implement the math."""

    #: registry name, the config's ``sae_type``
    name: ClassVar[str]
    #: SAELens ``architecture`` written to cfg.json
    saelens_architecture: ClassVar[str]
    #: hyperparameters this architecture takes beyond lr/dict_size_ratio/sparsity_coeff
    hyperparams: ClassVar[dict[str, HyperParam]] = {}
    #: parameters that multiply the (normalised) input: scaled by s when folding normalisation
    encoder_weights: ClassVar[tuple[str, ...]] = ("W_enc",)
    # the parameters and buffers every architecture has, with their types (nn.Module's
    # attribute lookup would leave a type checker guessing)
    W_dec: Tensor
    b_dec: Tensor
    sparsity_coeff: Tensor
    device_: torch.device

    #: whether the architecture implements :meth:`_fused_rows` (else the autograd step is used)
    fused: ClassVar[bool] = False
    #: factor between ``sparsity_coeff`` and the weight of the penalty P (see LOSS_CONVENTION)
    penalty_scale: ClassVar[float] = 1.0
    #: the names of the auxiliary loss terms the forward pass (:class:`Step`) and the fused step
    #: give, logged under these names
    aux_terms: ClassVar[tuple[str, ...]] = ()
    #: where the L0 controller starts the coefficient of a member trained for a ``target_l0``
    #: without an ``initial_coeff``: about the middle of the architecture's useful range
    initial_coeff: ClassVar[float] = 0.1
    #: factor on the L0 controller's step: below 1 for an architecture whose L0 follows its
    #: coefficient slowly (see :mod:`saesweep.training.l0_control`)
    l0_gain: ClassVar[float] = 1.0
    #: how the L0 controller steers the coefficient: ``pi`` (a PI step on log c, then held) or
    #: ``quadratic`` (the gradient of ``c0 * target * (L0 / target - 1)^2``, for architectures
    #: whose latents do not come back once the penalty closes them)
    l0_rule: ClassVar[str] = "pi"
    #: the architecture's default grid: axes beyond the common ones (``lr``, ``dict_size_ratio``
    #: and, when it applies, ``sparsity_coeff``: :data:`saesweep.config.sweep.COMMON_GRID`)
    grid: ClassVar[dict[str, list]] = {}
    #: one of the four classic types a sweep runs when it names none (ReLU, hard concrete,
    #: Gated, gated hard concrete); the others run when asked for
    classic: ClassVar[bool] = False
    #: place in listings (``saesweep grid``, reports): smaller first, then by name
    order: ClassVar[int] = 100
    #: whether ``sparsity_coeff`` means anything to the architecture (TopK types: no; a config
    #: that sets it for them is refused by name)
    uses_sparsity_coeff: ClassVar[bool] = True
    #: the default of ``train.resample_until``: the fraction of training after which dead
    #: features are no longer resampled
    resample_until: ClassVar[float] = 0.5
    #: learning-rate multipliers for some parameters (name -> factor; the rest learn at lr):
    #: Adam moves every weight by about lr per step whatever its gradient's scale, so a
    #: parameter whose useful values are far larger than lr * steps needs a larger step
    lr_scale: ClassVar[dict[str, float]] = {}
    #: bumped when a change to how the architecture trains changes what a config yields: it is
    #: part of the trial id when not 0, so results from before are never mixed with new ones
    #: (the ids of architectures still at 0 are unchanged)
    revision: ClassVar[int] = 0
    #: memory hint for planning (:func:`saesweep.memory.estimate_pack_bytes`): live
    #: ``[n, batch, d_sae]`` float tensors per member at the peak of a training step, for the
    #: largest way a step is computed (the autograd reference keeps its forward tensors and
    #: forms the gradients), plus two for allocator slack; and the same for evaluation (codes,
    #: masks, their sums). A new architecture that keeps the defaults is planned generously.
    train_wide: ClassVar[int] = 12
    eval_wide: ClassVar[int] = 6
    #: the same for the fused step on a CPU, one member and one token chunk at a time (its
    #: workspaces, gradients and noise); None: ``train_wide``
    fused_wide: ClassVar[Optional[int]] = None

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        members: Sequence[Mapping[str, Any]],
        seeds: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if len(members) != len(seeds) or not members:
            raise ValueError("need one seed per member and at least one member")
        self.d_in, self.d_sae, self.n = d_in, d_sae, len(members)
        self.device_ = torch.device(device)
        self.hp = [dict(m) for m in members]
        self.ws = Workspace()  # buffers of the fused step, reused from step to step
        # per-member generators: initialisation, and training noise (hard-concrete gates; see
        # kernels.NOISE_STREAMS: several streams per member, drawn in parallel)
        self.generators = [torch.Generator(device=self.device_).manual_seed(int(s)) for s in seeds]
        self.noise = [noise_streams(int(s), self.device_) for s in seeds]
        self.register_buffer("sparsity_coeff", self._member_tensor("sparsity_coeff", self.initial_coeff))
        self._init_parameters()
        self.normalize_decoder()

    # ----------------------------------------------------------------- construction helpers
    def _member_tensor(self, key: str, default: float = 0.0) -> Tensor:
        vals = [float(default if m.get(key) is None else m[key]) for m in self.hp]
        return torch.tensor(vals, dtype=torch.float32, device=self.device_)

    def _randn(self, *shape: int) -> Tensor:
        """One independent draw per member from its own generator, stacked: ``[n, *shape]``."""
        return torch.stack(
            [torch.randn(*shape, generator=g, device=self.device_) for g in self.generators]
        )

    def _param(self, name: str, value: Tensor) -> None:
        self.register_parameter(name, nn.Parameter(value.contiguous()))

    def _init_decoder_and_encoder(self, *enc_names: str) -> None:
        """W_dec: random unit rows; each named encoder weight starts as W_dec transposed, scaled
        by d_in / d_sae so that the first reconstructions are about the size of the input
        rather than d_sae / d_in times too large."""
        w_dec = self._randn(self.d_sae, self.d_in)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self._param("W_dec", w_dec)
        for name in enc_names:
            self._param(name, w_dec.transpose(1, 2) * self.encoder_init_scale)
        self._param("b_dec", torch.zeros(self.n, self.d_in, device=self.device_))

    @property
    def encoder_init_scale(self) -> float:
        """Encoder weights start as W_dec^T times this (d_in / d_sae, at most 1)."""
        return min(1.0, self.d_in / self.d_sae)

    def gate_init_scale(self, std: float) -> float:
        """Gate weights that start as W_dec^T times this give gate logits with a standard
        deviation of about ``std`` over unit-mean-squared-norm inputs (unit rows: W_dec x has
        variance 1/d per feature)."""
        return std * math.sqrt(self.d_in)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(self.n, *shape, device=self.device_)

    def reinit_features(self, row: int, idx: Tensor, dirs: Tensor, window: Tensor) -> None:
        """Called by dead-feature resampling after the generic re-initialisation of member
        ``row``'s features ``idx`` (decoder rows = ``dirs``, unit directions of drawn inputs
        minus b_dec; encoder columns small; per-feature vectors 0), with the recent inputs
        ``window`` ``[N, d]``: an architecture whose gates need another start overrides it."""

    def _init_parameters(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------------------- the math
    def encode(self, x: Tensor, *, train: bool = False, progress: float = 1.0) -> Tensor:
        """Codes ``f`` of shape ``[n, B, d_sae]`` for inputs ``x`` of shape ``[B, d_in]``."""
        return self._forward(x, train=train, progress=progress).codes

    def decode(self, f: Tensor) -> Tensor:
        return torch.matmul(f, self.W_dec) + self.b_dec[:, None, :]

    def centered(self, x: Tensor) -> Tensor:
        """x - b_dec for every member: ``[n, B, d_in]``."""
        return x - self.b_dec[:, None, :]

    def _forward(self, x: Tensor, *, train: bool, progress: float) -> Step:
        """The codes and the loss terms (see :class:`Step`); out of training the terms may be zeros."""
        raise NotImplementedError

    def penalty_weight(self, sparsity_scale: float = 1.0) -> Tensor:
        """Per-member weight of the penalty P in the loss: ``sparsity_coeff * penalty_scale``
        times the trainer's warm-up factor."""
        return self.sparsity_coeff * (self.penalty_scale * sparsity_scale)

    def total_loss(self, mse: Tensor, penalty: Tensor, aux: Tensor, sparsity_scale: float = 1.0) -> Tensor:
        """``SSE + weight * P + aux`` per member (LOSS_CONVENTION), from the per-element ``mse``."""
        return mse * self.d_in + self.penalty_weight(sparsity_scale) * penalty + aux

    def _step_scales(self, rows: slice, B: int, sparsity_scale: float) -> tuple[float, Tensor]:
        """The fused steps' constants for a batch of B: ``two_s`` with dL/dx_hat = two_s (x_hat - x)
        and ``kappa [k]``, the penalty's weight per token (dL/dP_token)."""
        return 2.0 / B, self.penalty_weight(sparsity_scale)[rows] / B

    def losses(self, x: Tensor, *, progress: float = 0.0, sparsity_scale: float = 1.0) -> Losses:
        """Training losses: ``SSE + sparsity_coeff * penalty_scale * P + aux`` per member.

        ``progress`` in [0, 1] drives schedules owned by the architecture (beta annealing);
        ``sparsity_scale`` is the trainer's sparsity warm-up factor.
        """
        step = self._forward(x, train=True, progress=progress)
        f = step.codes
        mse = mse_per_member(x, self.decode(f))
        terms = {name: step.aux[name] for name in self.aux_terms}
        aux = sum(terms.values(), torch.zeros_like(mse))
        total = self.total_loss(mse, step.penalty, aux, sparsity_scale)
        with torch.no_grad():
            l0 = (f != 0).float().sum(-1).mean(-1)
        return Losses(total=total, mse=mse, sparsity=step.penalty, aux=aux, l0=l0, terms=terms)

    # ------------------------------------------------------------------ training step
    def train_step(
        self,
        x: Tensor,
        *,
        progress: float = 0.0,
        sparsity_scale: float = 1.0,
        plan: StepPlan = StepPlan(),
        dtype: str = "float32",
        stats: bool = True,
    ) -> Losses:
        """Every member's training losses (detached), with their gradients written into ``.grad``.

        ``plan`` picks the fused or the autograd computation, loop or stacked members and the
        token chunk (see :func:`.kernels.plan_for`); ``dtype`` "bfloat16" computes the products
        and the big elementwise passes in bfloat16 (parameters, gradients and loss sums stay
        float32); ``stats`` asks for ``l0`` (one more pass, so only on logging steps). A member
        whose loss is not finite gets meaningless gradients; the caller drops it.
        """
        if plan.kernel == "autograd" or not self.fused:
            return self._autograd_step(x, progress, sparsity_scale, dtype)
        for p in self.parameters():
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = torch.zeros_like(p)
        cdt = compute_dtype(dtype)
        # mse, P, aux (their sum), l0, then each named auxiliary term
        out = torch.zeros(4 + len(self.aux_terms), self.n, dtype=torch.float32, device=x.device)
        groups = [slice(i, i + 1) for i in range(self.n)] if plan.mode == "loop" else [slice(0, self.n)]
        with torch.no_grad():
            for rows in groups:
                self._fused_rows(x, rows, plan.chunk, cdt, float(progress), float(sparsity_scale), stats, out[:, rows])
        mse, penalty, aux, l0 = out[:4]
        total = self.total_loss(mse, penalty, aux, sparsity_scale)
        terms = dict(zip(self.aux_terms, out[4:]))
        return Losses(total=total, mse=mse, sparsity=penalty, aux=aux, l0=l0 if stats else None, terms=terms)

    def _autograd_step(self, x: Tensor, progress: float, sparsity_scale: float, dtype: str) -> Losses:
        """The reference step: :meth:`losses` under autocast, then autograd."""
        for p in self.parameters():
            p.grad = None
        ctx = (torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
               else contextlib.nullcontext())
        with ctx:
            losses = self.losses(x, progress=progress, sparsity_scale=sparsity_scale)
        finite = torch.isfinite(losses.total.detach())
        losses.total[finite].sum().backward()  # a non-finite member must not poison the others
        return losses.detached()

    def _fused_rows(
        self, x: Tensor, rows: slice, chunk: Optional[int], cdt: torch.dtype, progress: float,
        sparsity_scale: float, stats: bool, out: Tensor,
    ) -> None:
        """Gradients of members ``rows`` into ``.grad[rows]``; ``out[:, j]`` = (mse, P, aux, l0,
        the named auxiliary terms) of member ``rows.start + j`` (:meth:`_write_stats` fills it).
        Implemented by the architectures that set ``fused``."""
        raise NotImplementedError

    def _ws(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return self.ws.get(name, shape, dtype, self.W_dec.device)

    def _grad_accumulators(self, k: int, d: int, enc_width: int, cdt: torch.dtype):
        """``(g_enc [k, d + 1, enc_width], g_dec^T [k, d, m], tmp_e, tmp_d)``: float32 gradient
        sums over the token chunks, and (in bf16 only) the scratch products they are added from."""
        f32, m = torch.float32, self.d_sae
        g_enc = self._ws("gWenc", (k, d + 1, enc_width), f32)
        g_dec = self._ws("gWdT", (k, d, m), f32)
        mixed = cdt != f32
        tmp_e = self._ws("tmp_e", (k, d + 1, enc_width), cdt) if mixed else None
        tmp_d = self._ws("tmp_d", (k, d, m), cdt) if mixed else None
        return g_enc, g_dec, tmp_e, tmp_d

    def _write_stats(self, out: Tensor, B: int, d: int, sse: Tensor, penalty: Tensor, nnz: Tensor,
                     aux: Optional[Mapping[str, Tensor]] = None) -> None:
        """Per-token means into ``out`` = (mse, P, aux, l0, each auxiliary term) from the sums over
        a batch of B (``mse`` per element; ``aux``: every name of ``aux_terms`` -> its weighted
        sum over the batch)."""
        out[0] = sse / (B * d)
        out[1] = penalty / B
        out[3] = nnz / B
        aux = aux or {}
        if set(aux) != set(self.aux_terms):
            raise ValueError(f"{self.name}: the fused step wrote the terms {sorted(aux)}, "
                             f"its aux_terms are {sorted(self.aux_terms)}")
        for j, name in enumerate(self.aux_terms):
            out[4 + j] = aux[name] / B
            out[2] += out[4 + j]

    def _centered_ones(self, x: Tensor, b_dec: Tensor, cdt: torch.dtype) -> Tensor:
        """``[k, B, d + 1]``: x - b_dec of each member with a column of ones (bias folding)."""
        k, (B, d) = b_dec.shape[0], x.shape
        xa = self._ws("xa", (k, B, d + 1), cdt)
        torch.sub(x, b_dec[:, None, :], out=xa[..., :d])
        xa[..., d] = 1
        return xa

    def _weight_with_bias(self, name: str, w: Tensor, b: Tensor, cdt: torch.dtype) -> Tensor:
        """``[k, d + 1, m]``: an encoder weight with its bias as the last row."""
        k, d, m = w.shape
        wa = self._ws(name, (k, d + 1, m), cdt)
        wa[:, :d].copy_(w)
        wa[:, d].copy_(b)
        return wa

    def _decoder_with_ones(self, w_dec: Tensor, cdt: torch.dtype) -> Tensor:
        """``[k, m, d + 1]``: W_dec with a column of ones (decode also returns sum_i f_i; the
        transposed product adds the last input column to every feature's gradient)."""
        k, m, d = w_dec.shape
        wda = self._ws("Wda", (k, m, d + 1), cdt)
        wda[..., :d].copy_(w_dec)
        wda[..., d] = 1
        return wda

    # ---------------------------------------------------------------- maintenance
    @torch.no_grad()
    def after_step(self) -> None:
        """The constraints the parameters keep, restored after every optimiser step: unit-norm
        decoder rows (an architecture with its own constraints extends this)."""
        self.normalize_decoder()

    @torch.no_grad()
    def after_training(self, x_held_out: Tensor) -> list[dict[str, float]]:
        """Called once when training ends, before evaluation, with held-out (normalised)
        activations ``[N, d_in]``: an architecture that sets inference-time state from data
        (a threshold) does it here and returns, per member, what it set (recorded in
        ``metrics.json``). Nothing by default."""
        return [{} for _ in range(self.n)]

    def export_metadata(self, i: int) -> dict[str, Any]:
        """What member ``i``'s exported ``cfg.json`` records in its metadata beyond the config
        (what :meth:`after_training` set, for one); nothing by default."""
        return {}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the (unit) row: the
        renormalisation after the step would undo it anyway, and it would only feed Adam's
        moments with a direction the constraint forbids."""
        g = self.W_dec.grad
        if g is not None:
            w = self.W_dec.detach()
            g.sub_(w * (g * w).sum(-1, keepdim=True))

    @torch.no_grad()
    def init_b_dec(self, mean: Tensor) -> None:
        """Start every member's decoder bias at the data mean (``[d_in]``)."""
        self.b_dec.copy_(mean.to(self.b_dec).expand_as(self.b_dec))

    @torch.no_grad()
    def select(self, keep: Sequence[int]) -> None:
        """Keep only the listed members (used to drop a diverged member from a pack)."""
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device_)
        for name, p in list(self.named_parameters(recurse=False)):
            grad = None if p.grad is None else p.grad.index_select(0, idx)
            self._param(name, p.detach().index_select(0, idx))
            getattr(self, name).grad = grad
        for name, b in list(self.named_buffers(recurse=False)):
            setattr(self, name, b.index_select(0, idx))
        self.generators = [self.generators[i] for i in keep]
        self.noise = [self.noise[i] for i in keep]
        self.hp = [self.hp[i] for i in keep]
        self.n = len(keep)
        self.ws.clear()

    def member(self, i: int) -> "PackedSAE":
        """A one-member view of member ``i`` for inference (shares storage, no gradients)."""
        view = copy.copy(self)
        view._parameters = {k: nn.Parameter(p.detach()[i : i + 1], requires_grad=False)
                            for k, p in self._parameters.items() if p is not None}
        view._buffers = {k: b[i : i + 1] for k, b in self._buffers.items() if b is not None}
        view.generators, view.noise, view.hp, view.n = [self.generators[i]], [self.noise[i]], [self.hp[i]], 1
        view.ws = Workspace()
        return view

    # -------------------------------------------------------------------- export
    @torch.no_grad()
    def member_state(self, i: int, scale: float = 1.0) -> dict[str, Tensor]:
        """Member ``i``'s parameters for raw (un-normalised) inputs.

        Training sees ``x_n = s * x``. Encoder weights times ``s`` and ``b_dec / s`` give the
        same codes on raw ``x``; ``W_dec / s`` and ``b_dec / s`` give ``x_hat_n / s``.
        """
        out: dict[str, Tensor] = {}
        for name, p in self.named_parameters(recurse=False):
            t = p[i].detach().float().clone()
            if name in self.encoder_weights:
                t = t * scale
            elif name in ("W_dec", "b_dec"):
                t = t / scale
            out[name] = t.contiguous()
        return out

    @torch.no_grad()
    def load_member_state(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`member_state` for a one-member pack (scale 1)."""
        for name, p in self.named_parameters(recurse=False):
            p.copy_(state[name].to(p).unsqueeze(0))

    def saelens_extra_cfg(self, i: int) -> dict[str, Any]:
        """Architecture-specific entries for cfg.json (hard-concrete constants, ...)."""
        return {}
