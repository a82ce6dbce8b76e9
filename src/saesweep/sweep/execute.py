"""A sweep on this host, from its spec to its outcome: the checks and the worker plan before
anything is written (:func:`plan_sweep`), then queueing the trials and running the workers
(:func:`run_sweep`). The CLI's ``run`` / ``sweep`` parse flags, call these and print."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig
from saesweep.config.sweep import SweepSpec
from saesweep.sweep.store import tally
from saesweep.sweep.urls import redact



@dataclass
class SweepPlan:
    """The devices found and the worker slots planned for a sweep."""

    found: Any
    slots: list


@dataclass
class SweepRun:
    """What a sweep did: the workers' outcome, every record of the store, and the counts by
    state of the trials it was asked to run (all of the store's when none were named)."""

    outcome: Any
    records: list
    counts: dict[str, int]
    retried: list[str] = field(default_factory=list)  # failed trials given a fresh attempt
    reevaluated: list[str] = field(default_factory=list)  # trained trials whose evaluation runs again


def check_targets(configs: Optional[Sequence[ExperimentConfig]]) -> None:
    """A ConfigError for a target L0 (or k) above the dictionary of an hf source's SAE, before anything
    starts (a synthetic source's width is known when its config is read, and checked then)."""
    from saesweep.memory import source_width

    for cfg in configs or ():
        if cfg.source.kind == "hf":
            d_in = source_width(cfg)
            if d_in:
                cfg.check_target(d_in)


def plan_sweep(spec: SweepSpec, configs: Optional[list[ExperimentConfig]], *, with_free: bool = False) -> SweepPlan:
    """Check what can be checked before anything is written, and plan the workers; a
    ConfigError names what is wrong. ``with_free`` asks the devices for free memory (a dry run
    only: asking torch would hold a CUDA context in this process)."""
    from saesweep.devices import detect
    from saesweep.sweep.planning import plan_workers
    from saesweep.sweep.storages import backend_for

    from saesweep.training.preflight import check_runtime

    check_targets(configs)
    check_runtime(configs if configs is not None else [spec.base_config(t) for t in spec.sae_types],
                  wandb=bool(spec.tracking.wandb))
    if spec.storage is None:  # the journal goes under the output folder: a bad one is the user's --output_dir
        from saesweep.io import check_creatable

        check_creatable(spec.output_dir, "--output_dir")
    # an explicit --max_parallel (or execution.max_parallel in the spec file) fixes the worker count
    mp = spec.execution.max_parallel if "max_parallel" in spec.execution.model_fields_set else None
    found = detect(with_free=with_free)
    slots = plan_workers(spec.execution.devices, mp, configs, spec.execution, found=found)
    backend = backend_for(str(spec.storage_url))
    backend.check(str(spec.storage_url))
    if len(slots) > 1 and not backend.concurrent_workers:
        raise ConfigError(
            f"--storage {redact(spec.storage_url)}: {backend.title} cannot serve {len(slots)} concurrent workers safely "
            "(claims can be duplicated); use a journal file path (the default) or postgresql://..., "
            "or run one worker (--max_parallel 1)"
        )
    return SweepPlan(found, slots)


def run_sweep(spec: SweepSpec, configs: Optional[list[ExperimentConfig]], plan: SweepPlan, *,
              from_files: bool = False, on_queued: Callable[[int, int], None] = lambda added, done: None,
              retry_failed: bool = False) -> SweepRun:
    """Queue ``configs`` (None: run what the store holds), run the planned workers until the
    queue is empty, and count. ``on_queued(added, already_complete)`` is told after queueing.
    ``retry_failed``: also give the trials that failed for good (retries spent, diverged) a fresh
    attempt; :attr:`SweepRun.retried` names them."""
    from saesweep.sweep.local import run_workers
    from saesweep.sweep.worker import open_sweep, queue_trials

    if spec.storage is None:
        from saesweep.io import ensure_folder

        ensure_folder(spec.output_dir, "--output_dir")
    store = open_sweep(spec)
    ids = None
    if configs is not None:
        added = queue_trials(store, spec, configs, from_files=from_files)
        ids = {c.trial_id for c in configs}
        on_queued(added, sum(1 for r in store.records() if r.trial_id in ids and r.state == "complete"))
    # trials trained before an evaluation that failed are evaluated again, not trained again
    from pathlib import Path

    reevaluated = store.requeue_unevaluated(Path(store.info.get("checkpoint_dir", spec.sweep_dir / "checkpoints")), ids)
    retried = store.requeue_failed(ids) if retry_failed else []
    outcome = run_workers(store, spec.execution, plan.slots, policy=spec.execution.policy)
    if outcome.outage:  # the database is away: there is nothing to read until it is back
        return SweepRun(outcome, [], {}, retried, reevaluated)
    records = store.records()
    # the selected trials only, not the whole store
    counts = tally([r for r in records if ids is None or r.trial_id in ids])
    return SweepRun(outcome, records, counts, retried, reevaluated)
