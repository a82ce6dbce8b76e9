"""Train a pack of SAEs on one activation stream.

A *pack* is a list of experiment configs that share everything but their per-member
hyperparameters (``lr``, ``sparsity_coeff``, ``aux_coeff``, ``initial_beta``, ``final_beta``):
same source, SAE type, width, gate kind, seed, batch size, token budget and schedules. They
are trained in one process on one stream of batches, each with its own parameters, optimiser
state, generator and log. A plain ``run`` is a pack of one.

A member whose loss stops being finite is stopped and reported as diverged; the others go on
untouched. With ``checkpoint`` set, the full training state (weights, Adam moments, step,
generators, logs) is saved atomically every ``checkpoint_every_s`` seconds, and a later call
with the same members (or a subset) resumes from it.

Speed (measured in benchmarks/, see benchmarks/README.md): each step is the architectures'
fused step (:meth:`~saesweep.saes.PackedSAE.train_step`: hand-written gradients, bias folding,
token chunks, reused buffers), members one at a time on CPU and stacked on GPUs
(:func:`~saesweep.saes.kernels.plan_for`), then per-member clipping, PyTorch's fused Adam
kernel (one call per member) and the decoder renormalisation. ``train.dtype: bfloat16`` runs
the products and elementwise passes in bfloat16.

Decoder rows stay at unit norm: the part of W_dec's gradient parallel to each row is removed
before the step (so Adam's moments see only the useful part) and the rows are renormalised
after it, as SAELens and dictionary_learning do. ``b_dec`` starts at the data mean. Dead
features are resampled on schedule (:mod:`saesweep.training.resample`, ``train.resample_every``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from saesweep import packing, saes
from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig
from saesweep.data.base import Activations
from saesweep.devices import resolve_dtype
from saesweep.errors import CorruptFile
from saesweep.io import atomic_save_tensors, load_tensors
from saesweep.progress import progress_bar
from saesweep.saes.kernels import plan_for
from saesweep.training.l0_control import L0Controller
from saesweep.training.optim import PackedAdam, clip_grad_norm_per_member
from saesweep.training.resample import Resampler


def lr_factor(step: int, total: int, cfg) -> float:
    """Linear warm-up over ``lr_warmup_frac`` of the steps, then cosine/linear decay."""
    warm = int(round(cfg.lr_warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_decay == "constant":
        return 1.0
    p = (step - warm) / max(1, total - warm)
    if cfg.lr_decay == "cosine":
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * p))
    return 1.0 - (1 - cfg.min_lr_factor) * p


def sparsity_factor(step: int, total: int, cfg) -> float:
    warm = int(round(cfg.sparsity_warmup_frac * total))
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


@dataclass
class Member:
    config: ExperimentConfig
    status: str = "running"  # running | complete | diverged | pruned
    reason: Optional[str] = None
    log: list[dict[str, Any]] = field(default_factory=list)
    resampled: int = 0  # dead features re-initialised so far


@dataclass
class PackResult:
    sae: saes.PackedSAE  # holds the members that completed, in order
    members: list[Member]  # every member, in the order given
    alive: list[int]  # indices into ``members`` of the SAE's rows
    steps: int
    tokens: int
    wall_s: float
    resumed_from: int = 0
    dtype: str = "float32"  # the compute dtype used (``train.dtype`` resolved for the device)
    #: training seconds of the attempts before the resumed one (from the checkpoint)
    earlier_wall_s: float = 0.0
    #: writes the finished pack's full state to its checkpoint (None without a checkpoint path),
    #: so a later call resumes it with nothing left to train
    save_checkpoint: Optional[Callable[[], None]] = None

    @property
    def train_s(self) -> float:
        """Training seconds of the whole run, earlier attempts included."""
        return self.earlier_wall_s + self.wall_s

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of one SAE of the pack (each member sees every token)."""
        return self.tokens / max(self.wall_s, 1e-9)

    @property
    def pack_tokens_per_s(self) -> float:
        """SAE-tokens per second of the whole pack: :attr:`tokens_per_s` times the pack size."""
        return self.tokens * len(self.members) / max(self.wall_s, 1e-9)


def resolve_device(spec: str) -> torch.device:
    """``auto`` (the first GPU, else Apple's MPS, else the CPU) or a device this machine has;
    a ConfigError naming the device otherwise."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"train.device: {spec} is not on this machine ({n} CUDA device(s); "
                              f"`saesweep devices` lists them)")
    elif dev.type == "mps" and not mps:
        raise ConfigError(f"train.device: {spec} is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def build_sae(configs: Sequence[ExperimentConfig], d_in: int, device: torch.device) -> saes.PackedSAE:
    c0 = configs[0]
    cls = saes.get(c0.sae_type)
    return cls(d_in, c0.d_sae(d_in), [c.sae_hparams for c in configs], [c.train.seed for c in configs], device=device)


#: the share of training time checkpoint writes may take when the interval adapts
CHECKPOINT_SHARE = 0.01


def train_pack(
    configs: Sequence[ExperimentConfig],
    data: Activations,
    *,
    device: torch.device | str = "cpu",
    show_progress: Optional[bool] = None,
    checkpoint: Optional[Path] = None,
    checkpoint_every_s: float = 300.0,
    checkpoint_min_s: Optional[float] = None,
    resume_from: Optional[Path] = None,
    on_log: Optional[Callable[[ExperimentConfig, dict], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    should_prune: Optional[Callable[[ExperimentConfig, dict], bool]] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
) -> PackResult:
    """Train every config of a pack on ``data``; see the module docstring.

    Checkpoints come every ``checkpoint_every_s`` seconds; with ``checkpoint_min_s``, as often as
    keeps a write under :data:`CHECKPOINT_SHARE` of the training time (the last write's time),
    within [``checkpoint_min_s``, ``checkpoint_every_s``]. ``on_checkpoint(path)`` is told after
    each write."""
    packing.check_pack(configs)
    for c in configs:
        c.check_target(data.d_in)
    device = torch.device(device)
    tc = configs[0].train
    total = tc.steps
    members = [Member(c) for c in configs]
    alive = list(range(len(configs)))

    source = resume_from or checkpoint  # a pack re-formed from part of an interrupted one resumes from its file
    resumed = _load_checkpoint(source, configs, data.d_in, device, members) if source else None
    control = None
    earlier_s = 0.0
    if resumed is not None:
        sae, opt, start, alive, saved_control, earlier_s = resumed
        control = L0Controller.for_pack([configs[i] for i in alive], total, device, type(sae))
        if control is not None:
            control.load_state_tensors(*saved_control)
    else:
        start = 0
        sae = build_sae(configs, data.d_in, device)
        sae.init_b_dec(data.mean().to(device))
        opt = PackedAdam(sae.named_parameters(), torch.tensor([c.lr for c in configs]), (tc.adam_beta1, tc.adam_beta2),
                         lr_scale=sae.lr_scale)
        control = L0Controller.for_pack(configs, total, device, type(sae))

    batches = data.train_batches(tc.batch_size, tc.seed, start=start)
    plan = plan_for(device, sae.n, sae.d_in, sae.d_sae, tc.batch_size)
    dtype = resolve_dtype(tc.dtype, str(device))
    resampler = Resampler(total, tc.resample_every, tc.resample_until, tc.batch_size) if tc.resample_every > 0 else None
    t0 = time.perf_counter()
    last_ckpt = t0
    interval = checkpoint_every_s if checkpoint_min_s is None else checkpoint_min_s

    def save(at_step: int) -> None:
        nonlocal interval
        w0 = time.perf_counter()
        _save_checkpoint(checkpoint, at_step, sae, opt, members, alive, control,
                         earlier_s + time.perf_counter() - t0)
        if checkpoint_min_s is not None:
            interval = min(checkpoint_every_s, max(checkpoint_min_s, (time.perf_counter() - w0) / CHECKPOINT_SHARE))
        if on_checkpoint is not None:
            on_checkpoint(checkpoint)

    non_blocking = device.type == "cuda"
    desc = f"{configs[0].sae_type} x{len(configs)}" if len(configs) > 1 else configs[0].trial_id
    with progress_bar(total, desc, enabled=show_progress, tokens_per_step=tc.batch_size) as bar:
        bar.advance(start)
        for step in range(start, total):
            if should_stop is not None and should_stop():
                break
            x = next(batches).to(device, non_blocking=non_blocking)
            progress = step / max(1, total - 1)
            logging = step % tc.log_every == 0 or step == total - 1
            losses = sae.train_step(x, progress=progress, sparsity_scale=sparsity_factor(step, total, tc),
                                    plan=plan, dtype=dtype, stats=logging)
            finite = torch.isfinite(losses.total)
            if not bool(finite.all()):  # stop the diverged members; the others take this step as usual
                keep = _drop_diverged(finite, losses, step, sae, opt, members, alive, control)
                alive = [alive[i] for i in keep]
                if not keep:
                    break
                losses = _select_losses(losses, keep)
                plan = plan_for(device, sae.n, sae.d_in, sae.d_sae, tc.batch_size)
            sae.remove_parallel_decoder_grad()
            if tc.grad_clip is not None:
                clip_grad_norm_per_member(sae.parameters(), tc.grad_clip)
            lrf = lr_factor(step, total, tc)
            opt.step(lrf)
            sae.after_step()
            if control is not None and control.due(step):
                control.update(sae.sparsity_coeff, control.measure(sae, x), lrf, step)
            if resampler is not None:
                resampler.observe(x)
                if resampler.due(step):
                    for row, n_new in enumerate(resampler(sae, opt)):
                        members[alive[row]].resampled += n_new

            if logging:
                _log(step, tc, losses, alive, members, opt, total, on_log, sae, control)
                r = members[alive[0]].log[-1]
                bar.set(loss=r["loss"], l0=r["l0"])
                if should_prune is not None and step < total - 1:
                    alive = _prune(should_prune, step, sae, opt, members, alive, control)
                    if not alive:
                        break
                    plan = plan_for(device, sae.n, sae.d_in, sae.d_sae, tc.batch_size)
            bar.advance(1)
            if checkpoint is not None and time.perf_counter() - last_ckpt > interval:
                save(step + 1)
                last_ckpt = time.perf_counter()
        else:
            step = total
    if should_stop is not None and step < total and checkpoint is not None and alive:
        save(step)
    wall = time.perf_counter() - t0
    done = step >= total
    for i in alive:
        if done:
            members[i].status = "complete"
    res = PackResult(sae, members, alive, steps=step, tokens=(step - start) * tc.batch_size, wall_s=wall,
                     resumed_from=start, dtype=dtype, earlier_wall_s=earlier_s)
    if checkpoint is not None and alive:
        def save_final() -> None:
            _save_checkpoint(checkpoint, step, sae, opt, members, alive, control, res.train_s)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint)

        res.save_checkpoint = save_final
    return res


def _prune(should_prune, step, sae, opt, members, alive, control=None) -> list[int]:
    """Stop the members the pruner rejects (Optuna median/ASHA on intermediate values)."""
    keep = []
    for row, i in enumerate(alive):
        m = members[i]
        if should_prune(m.config, m.log[-1]):
            m.status, m.reason = "pruned", f"pruned at step {step}"
        else:
            keep.append(row)
    if len(keep) < len(alive):
        if keep:
            _select(keep, sae, opt, control)
        alive = [alive[r] for r in keep]
    return alive


def _select_losses(losses, keep):
    idx = torch.tensor(keep, device=losses.total.device)
    return losses.map(lambda t: t.detach().index_select(0, idx))


def _select(keep: list[int], sae, opt, control) -> None:
    """Keep only the pack's rows ``keep`` in the SAE, the optimiser and the controller."""
    sae.select(keep)
    opt.rebind(sae.named_parameters(), keep)
    if control is not None:
        control.select(keep)


def _drop_diverged(finite: Tensor, losses, step, sae, opt, members, alive, control=None) -> list[int]:
    keep = [i for i, ok in enumerate(finite.tolist()) if ok]
    for i, ok in enumerate(finite.tolist()):
        if not ok:
            m = members[alive[i]]
            m.status = "diverged"
            m.reason = f"diverged: loss is {float(losses.total[i].detach())} at step {step}"
    if keep:
        _select(keep, sae, opt, control)
    return keep


@torch.no_grad()
def _log(step, tc, losses, alive, members, opt, total, on_log, sae, control) -> None:
    lrf = lr_factor(step, total, tc)
    cols = {
        "loss": losses.total.float().tolist(),
        "mse": losses.mse.float().tolist(),
        "sparsity": losses.sparsity.float().tolist(),
        "aux": losses.aux.float().tolist(),
        "l0": losses.l0.float().tolist(),
        **{name: t.float().tolist() for name, t in losses.terms.items()},  # the auxiliary terms by name
    }
    steered = control.steered.tolist() if control is not None else [False] * len(alive)
    coeff = sae.sparsity_coeff.tolist()
    for row, i in enumerate(alive):
        rec = {"step": step, "tokens": (step + 1) * tc.batch_size, "lr": float(opt.lr[row]) * lrf}
        rec.update({k: v[row] for k, v in cols.items()})
        if steered[row]:  # the coefficient's trajectory
            rec["sparsity_coeff"] = coeff[row]
        members[i].log.append(rec)
        if on_log is not None:
            on_log(members[i].config, rec)


# ------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, step: int, sae, opt: PackedAdam, members, alive, control=None,
                     train_s: float = 0.0) -> None:
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    tensors.update(opt.state_tensors())
    if control is not None:
        tensors.update(control.state_tensors())
    for row, g in enumerate(sae.generators):
        tensors[f"gen.{row}"] = g.get_state()
    for row, streams in enumerate(sae.noise):
        for j, g in enumerate(streams):
            tensors[f"noise.{row}.{j}"] = g.get_state()
    meta = {
        "step": step,
        "train_s": train_s,
        "adam_steps": opt.steps,
        "alive": [members[i].config.trial_id for i in alive],
        "members": {
            m.config.trial_id: {"status": m.status, "reason": m.reason, "log": m.log, "resampled": m.resampled}
            for m in members
        },
    }
    atomic_save_tensors(path, tensors, {"saesweep": json.dumps(meta)})


def _load_checkpoint(path: Path, configs, d_in: int, device, members: list[Member]):
    """Resume from ``path`` when it covers every member; returns (sae, optimiser, step, alive,
    (L0 controller tensors, their rows), training seconds before it) or None. A damaged checkpoint (a torn or truncated file, a header or tensors that do not fit)
    is removed with a warning, and the members start from step 0: it never fails a trial."""
    if not path.exists():
        return None
    try:
        return _read_checkpoint(path, configs, d_in, device, members)
    except Exception as e:  # a checksum mismatch, safetensors' SafetensorError, JSON, shapes, missing keys...
        what = "corrupt (its tensors do not match their checksum)" if isinstance(e, CorruptFile) else \
            f"damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        warnings.warn(f"checkpoint {path} is {what}; removed, and its trials start from step 0", stacklevel=2)
        for m in members:
            m.log, m.resampled = [], 0
        path.unlink(missing_ok=True)
        return None


def _read_checkpoint(path: Path, configs, d_in: int, device, members: list[Member]):
    tensors, metadata = load_tensors(path, device=str(device))  # CorruptFile on a checksum mismatch
    meta = json.loads(metadata["saesweep"])
    ids = [m.config.trial_id for m in members]
    saved_alive: list[str] = meta["alive"]
    if not set(ids) <= set(meta["members"]) or not saved_alive:
        return None
    tc = configs[0].train
    # an SAE shaped like the checkpoint; every parameter and per-member buffer is loaded
    sae = build_sae([configs[0]] * len(saved_alive), d_in, device)
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}, strict=True)
    for row, g in enumerate(sae.generators):
        g.set_state(tensors[f"gen.{row}"].cpu())
    for row, streams in enumerate(sae.noise):  # absent in checkpoints written before noise streams
        for j, g in enumerate(streams):
            if f"noise.{row}.{j}" in tensors:
                g.set_state(tensors[f"noise.{row}.{j}"].cpu())
    opt = PackedAdam(sae.named_parameters(), tensors["adam.lr"], (tc.adam_beta1, tc.adam_beta2), lr_scale=sae.lr_scale)
    opt.load_state_tensors(tensors, meta["adam_steps"])
    rows, alive = [], []
    for i, tid in enumerate(ids):
        info = meta["members"][tid]
        members[i].log = list(info["log"])
        members[i].resampled = int(info.get("resampled", 0))
        if tid in saved_alive:
            rows.append(saved_alive.index(tid))
            alive.append(i)
        else:
            members[i].status, members[i].reason = info["status"], info["reason"]
    if not rows:
        return None
    sae.select(rows)
    opt.rebind(sae.named_parameters(), rows)
    sae.hp = [configs[i].sae_hparams for i in alive]
    control = {k: v for k, v in tensors.items() if k.startswith("l0_control.")}
    return sae, opt, int(meta["step"]), alive, (control, rows), float(meta.get("train_s", 0.0))
