"""``run(config) -> RunResult``: one experiment from a config to a trained, evaluated, saved SAE.

``run_pack`` does the same for a pack of compatible configs on one activation stream (a plain
``run`` is a pack of one). Each member's run folder ``<output_dir>/<trial_id>/`` receives,
atomically and in this order: ``config.yaml`` (resolved), ``train_log.jsonl``, the SAE
(``sae_weights.safetensors`` + ``cfg.json``, SAELens layout, normalisation folded in) and
``metrics.json`` last, so a folder with ``metrics.json`` is a finished trial. A member that
diverged gets ``failure.json`` with the reason instead of weights and metrics.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from saesweep import packing
from saesweep.version import __version__
from saesweep.errors import ConfigError
from saesweep.config.experiment import (
    ExperimentConfig,
    load_config,
    parse_config,
)
from saesweep.data import Activations, open_source
from saesweep.io import atomic_write_json, atomic_write_text, ensure_folder, sha256_file
from saesweep.metrics.reconstruction import evaluate, first_nonfinite
from saesweep.sae_files import CFG_FILE, WEIGHTS_FILE, export_member
from saesweep.saes import LOSS_CONVENTION
from saesweep.training.trainer import resolve_device, train_pack

METRICS_FILE = "metrics.json"
FAILURE_FILE = "failure.json"
#: written last, when a run's results are all saved: the trial id and the digest of metrics.json
COMPLETE_FILE = "complete.json"
INTERRUPTED = "interrupted before the end of training (checkpointed)"
ConfigLike = Union[ExperimentConfig, dict, str, Path]


class EvaluationFailed(RuntimeError):
    """Evaluation raised after training finished. The trained weights are saved in the run
    folders, and ``checkpoint`` (when not None) holds the pack's trained state, from which a
    later attempt evaluates without training again."""

    def __init__(self, reason: str, checkpoint: Optional[Path] = None) -> None:
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


@dataclass
class RunResult:
    trial_id: str
    status: str  # "complete", "failed" or "pruned"
    run_dir: Path
    config: ExperimentConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def target_metrics(cfg: ExperimentConfig, metrics: dict[str, Any], sae, row: int) -> dict[str, Any]:
    """For a trial trained to a ``target_l0``: the target, ``l0_error`` (held-out L0 / target - 1)
    and, where the trainer steered it, the coefficient it ended with."""
    if cfg.target_l0 is None:
        return {}
    out: dict[str, Any] = {"target_l0": float(cfg.target_l0)}
    if isinstance(metrics.get("l0"), (int, float)):
        out["l0_error"] = float(metrics["l0"]) / float(cfg.target_l0) - 1.0
    if cfg.steers_coeff:
        out["final_sparsity_coeff"] = float(sae.sparsity_coeff[row])
    return out


def finished_result(cfg: ExperimentConfig) -> Optional[dict[str, Any]]:
    """The metrics of ``cfg``'s run when its folder holds a finished result (``metrics.json`` and
    the completion marker naming this trial and that file's digest), else None: a worker that
    trained a trial but could not record it leaves it for the next worker to record."""
    out = cfg.run_dir
    try:
        marker = json.loads((out / COMPLETE_FILE).read_text())
        if marker.get("trial_id") != cfg.trial_id or marker.get("metrics_sha256") != sha256_file(out / METRICS_FILE):
            return None
        record = json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError, AttributeError):
        return None
    metrics = record.get("metrics") if record.get("trial_id") == cfg.trial_id else None
    return metrics if isinstance(metrics, dict) and metrics else None


def as_config(obj: ConfigLike) -> ExperimentConfig:
    if isinstance(obj, ExperimentConfig):
        return obj
    if isinstance(obj, dict):
        return parse_config(obj)
    if isinstance(obj, (str, Path)):
        return load_config(obj)
    raise ConfigError(f"expected an ExperimentConfig, a dict or a YAML path, got {type(obj).__name__}")


def run(
    config: ConfigLike,
    *,
    device: Optional[str] = None,
    show_progress: Optional[bool] = None,
    on_log: Optional[Callable[[ExperimentConfig, dict], None]] = None,
) -> RunResult:
    """Train, evaluate and save one SAE. Accepts a config object, a dict or a YAML path."""
    return run_pack([as_config(config)], device=device, show_progress=show_progress, on_log=on_log)[0]


def run_pack(
    configs: Sequence[ExperimentConfig],
    *,
    device: Optional[str] = None,
    show_progress: Optional[bool] = None,
    checkpoint: Optional[Path] = None,
    checkpoint_every_s: float = 300.0,
    checkpoint_min_s: Optional[float] = None,
    resume_from: Optional[Path] = None,
    on_log: Optional[Callable[[ExperimentConfig, dict], None]] = None,
    data: Optional[Activations] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    should_prune: Optional[Callable[[ExperimentConfig, dict], bool]] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
) -> list[RunResult]:
    """Train a pack of compatible configs together; one result per config, in order."""
    configs = [as_config(c) for c in configs]
    packing.check_pack(configs)
    dev = resolve_device(device or configs[0].train.device)
    for out in {c.output_dir for c in configs}:
        ensure_folder(out, "output_dir")
    t_start = time.perf_counter()
    if data is None:
        data = open_source(configs[0], device=dev)
    t_data = time.perf_counter() - t_start
    res = train_pack(
        configs, data, device=dev, show_progress=show_progress,
        checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s, checkpoint_min_s=checkpoint_min_s,
        resume_from=resume_from, on_log=on_log, should_stop=should_stop, should_prune=should_prune,
        on_checkpoint=on_checkpoint,
    )
    # an interrupted pack (Ctrl-C, preemption) has no complete member: nothing to evaluate, so
    # the interruption returns at once and its checkpoint resumes the training later
    finished = any(res.members[i].status == "complete" for i in res.alive)
    # inference-time state set from held-out data (a calibrated threshold), before export
    settled = res.sae.after_training(data.eval_activations()) if finished else [{} for _ in res.alive]
    row_of = {m: r for r, m in enumerate(res.alive)}
    for i, member in enumerate(res.members):  # what training made is on disk before evaluation starts
        out = member.config.run_dir
        atomic_write_text(out / "config.yaml", member.config.to_yaml())
        atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in member.log))
        if i in row_of and member.status == "complete":
            export_member(res.sae, row_of[i], member.config, data.scale, out)
    t_eval = time.perf_counter()
    frac = configs[0].eval.ce_time_frac
    # the whole run's training time, when resumed
    train_s = res.train_s if res.earlier_wall_s else res.wall_s * res.steps / max(1, res.steps - res.resumed_from)
    budget = None if frac is None else frac * train_s
    try:
        metrics = evaluate(res.sae, data, configs[0].eval.batch_size, budget_s=budget) if finished else []
    except Exception as e:
        saved = False
        if res.save_checkpoint is not None:  # the trained state, so that a re-run only evaluates
            res.save_checkpoint()
            saved = True
        reason = f"evaluation failed: {type(e).__name__}: {e}".strip()
        for i, member in enumerate(res.members):
            if i in row_of and member.status == "complete":
                atomic_write_json(member.config.run_dir / FAILURE_FILE, {"trial_id": member.config.trial_id,
                                                                        "reason": reason, "trained": True})
        raise EvaluationFailed(reason, checkpoint=checkpoint if saved else None) from e
    t_eval = time.perf_counter() - t_eval
    common = {
        "tokens": res.steps * configs[0].train.batch_size,
        "train_time_s": res.wall_s,
        "eval_time_s": t_eval,
        "data_time_s": t_data,
        "tokens_per_s": res.tokens_per_s,
        "pack_tokens_per_s": res.pack_tokens_per_s,
        "pack_size": len(configs),
        "device": str(dev),
        "dtype": res.dtype,
        "resumed_from_step": res.resumed_from,
        "d_in": data.d_in,
        "d_sae": res.sae.d_sae,
    }
    results: list[RunResult] = []
    for i, member in enumerate(res.members):
        cfg = member.config
        out = cfg.run_dir
        if i in row_of and member.status == "complete":
            m = {**metrics[row_of[i]], **common, **settled[row_of[i]], "resampled_features": member.resampled,
                 **target_metrics(cfg, metrics[row_of[i]], res.sae, row_of[i])}
            bad = first_nonfinite(m)
            if bad is None:
                (out / FAILURE_FILE).unlink(missing_ok=True)
                density = m.pop("feature_density", None)
                record = {"trial_id": cfg.trial_id, "sae_type": cfg.sae_type, "metrics": m, "feature_density": density,
                          "loss_convention": LOSS_CONVENTION,
                          "source": data.describe(), "saesweep_version": __version__, "host": platform.node()}
                atomic_write_json(out / METRICS_FILE, record)
                atomic_write_json(out / COMPLETE_FILE, {"trial_id": cfg.trial_id,
                                                        "metrics_sha256": sha256_file(out / METRICS_FILE)})
                results.append(RunResult(cfg.trial_id, "complete", out, cfg, m))
                continue
            member.status, member.reason = "diverged", f"diverged: metric {bad} is not finite after training"
            for name in (WEIGHTS_FILE, CFG_FILE):  # a diverged member keeps no weights
                (out / name).unlink(missing_ok=True)
        reason = member.reason or INTERRUPTED
        (out / COMPLETE_FILE).unlink(missing_ok=True)
        atomic_write_json(out / FAILURE_FILE, {"trial_id": cfg.trial_id, "reason": reason})
        status = "pruned" if member.status == "pruned" else "failed"
        results.append(RunResult(cfg.trial_id, status, out, cfg, {"last_log": member.log[-1]} if member.log else {}, reason))
    return results
