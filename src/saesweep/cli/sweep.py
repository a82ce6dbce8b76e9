"""Sweep subcommands that plan and run: grid, generate, run, sweep, worker.

All of them expand the one sweep spec (:mod:`saesweep.config.sweep`) and run through the one
engine (:mod:`saesweep.sweep.worker`). Reading a sweep (status, results, baseline) is in
:mod:`.results`; devices and the activation cache in :mod:`.cache`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from saesweep.cli.common import (
    EXIT_OK,
    count_by_type,
    flag,
    positive_int,
    run_flags,
    spec_flags,
    spec_from_args,
)
from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig, load_config
from saesweep.io import atomic_write_text, ensure_folder
from saesweep.sweep.urls import redact

PREVIEW = 5


def describe_params(cfg: ExperimentConfig, fields: Sequence[str]) -> str:
    from saesweep.config.experiment import get_dotted

    return " ".join(f"{f}={get_dotted(cfg, f)}" for f in fields if get_dotted(cfg, f) is not None)


# --------------------------------------------------------------------------- grid
def grid_args(p):
    spec_flags(p)
    flag(p, "format", choices=["table", "json"], default="table")


def cmd_grid(args) -> int:
    import json

    spec = spec_from_args(args)
    rows = [(t, spec.grids[t], spec.grid_size(t)) for t in spec.sae_types]
    if args.format == "json":
        print(json.dumps({t: {"params": {k: v if isinstance(v, list) else v.model_dump() for k, v in g.items()}, "count": n}
                          for t, g, n in rows}, indent=2))
        return EXIT_OK
    total = 0
    for t, grid, n in rows:
        dims = " x ".join(str(len(v)) for v in grid.values())
        print(f"{t}: {dims} = {n} experiments")
        for k, v in grid.items():
            print(f"    {k}: {v if isinstance(v, list) else v.model_dump()}")
        total += n
    print(f"Grand total: {total} experiments" + (f" (limit {spec.limit})" if spec.limit else ""))
    others = [t for t in spec.grids if t not in spec.sae_types]
    if others:
        print("Not in this sweep (add with --sae_types): "
              + ", ".join(f"{t} {spec.grid_size(t)}" for t in others) + " experiments")
    return EXIT_OK


# ----------------------------------------------------------------------- generate
def generate_args(p):
    flag(p, "output_dir", required=True, help="folder that receives one YAML per experiment")
    spec_flags(p)


def cmd_generate(args) -> int:
    from saesweep.config.sweep import expand, swept_params

    spec = spec_from_args(args)
    configs = expand(spec)
    out = ensure_folder(args.output_dir, "--output_dir")
    written = 0
    for i, cfg in enumerate(configs):
        cfg = cfg.with_updates(output_dir="runs")  # `saesweep run` decides where results go
        path = out / f"{cfg.trial_id}.yaml"
        header = (f"# saesweep experiment {i + 1}/{len(configs)} of sweep '{spec.name}'\n"
                  f"# swept: {describe_params(cfg, list(swept_params(spec, cfg)))}\n")
        if not path.exists():
            atomic_write_text(path, header + cfg.to_yaml())
            written += 1
    counts = count_by_type(configs)
    print(f"Wrote {written} configs to {out} ({len(configs) - written} already there): {counts}")
    print(f"Run them with: saesweep run --config_dir {out}")
    return EXIT_OK


# ---------------------------------------------------------------------- run / sweep
def run_args(p):
    flag(p, "config_dir", required=True, help="folder of experiment YAMLs (from `saesweep generate`)")
    flag(p, "filter", help="only configs of this SAE type (or whose file name contains this text)")
    run_flags(p)


def read_config_dir(config_dir: str, filt: Optional[str]) -> list[ExperimentConfig]:
    from saesweep import saes

    d = Path(config_dir)
    if not d.is_dir():
        raise ConfigError(f"--config_dir {config_dir}: not a folder")
    files = sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
    if filt:
        if filt in saes.names():
            files = [f for f in files if _type_of(f) == filt]
        else:
            files = [f for f in files if filt in f.name]
    configs = [load_config(f) for f in files]  # every file is checked before anything runs
    if filt in saes.names():
        configs = [c for c in configs if c.sae_type == filt]
    if not configs:
        raise ConfigError(f"--config_dir {config_dir}: no configs" + (f" matching --filter {filt}" if filt else ""))
    return configs


def _type_of(path: Path) -> str:
    import yaml

    try:
        return (yaml.safe_load(path.read_text()) or {}).get("sae_type", "relu")
    except Exception:
        return ""  # load_config reports the problem


def cmd_run(args) -> int:
    configs = read_config_dir(args.config_dir, args.filter)
    name = args.name or Path(args.config_dir).resolve().name
    spec = spec_from_args(args, name=name)
    if getattr(args, "limit", None):
        configs = configs[: args.limit]
    configs = [c.with_updates(output_dir=str(spec.trials_dir)) for c in configs]
    return execute(args, spec, configs, from_files=True)


def sweep_args(p):
    spec_flags(p)
    run_flags(p)
    flag(p, "config_dir", help="run a folder of config YAMLs instead of the spec's grids")
    flag(p, "filter", help="with --config_dir: only this SAE type (or file names containing this text)")


def cmd_sweep(args) -> int:
    from saesweep.config.sweep import expand

    if args.config_dir:
        return cmd_run(args)
    spec = spec_from_args(args)
    return execute(args, spec, expand(spec) if spec.search.is_grid else None)


def execute(args, spec, configs: Optional[list[ExperimentConfig]], *, from_files: bool = False) -> int:
    """Shared by run / sweep: dry run, or queue the trials and run the workers (saesweep.sweep.execute)."""
    from saesweep.sweep.execute import plan_sweep, run_sweep

    if getattr(args, "show_devices", False):
        from saesweep.cli.cache import cmd_devices

        return cmd_devices(args)
    plan = plan_sweep(spec, configs, with_free=bool(args.dry_run))
    if configs is not None:  # before anything is written: models, hooks, and the disk the activations need
        print_activation_plans(configs, spec.execution.pack_size)
    if args.dry_run:
        return dry_run(spec, configs, plan.slots, plan.found)
    from saesweep.sweep.display import print_worker_table
    t0 = time.perf_counter()

    def queued(added: int, done: int) -> None:
        assert configs is not None
        print(f"Sweep '{spec.name}': {len(configs)} experiments ({count_by_type(configs)}); {added} new, "
              f"{done} already complete  [{spec.sweep_dir}]")
        print_plan(plan.found, plan.slots, spec.execution.pack_size, spec.execution.policy)

    if configs is None:
        print_plan(plan.found, plan.slots, spec.execution.pack_size, spec.execution.policy)
    run = run_sweep(spec, configs, plan, from_files=from_files, on_queued=queued,
                    retry_failed=bool(getattr(args, "retry_failed", False)))
    outcome, recs, c = run.outcome, run.records, run.counts
    from saesweep.sweep.store import count_line, failure_line

    if outcome.outage:
        print(f"stopped: {outcome.aborted}", file=sys.stderr)
        return outcome.exit_code
    if run.retried:
        print(f"Retried {len(run.retried)} trial(s) that had failed")
    if run.reevaluated:
        print(f"Evaluated again {len(run.reevaluated)} trained trial(s) whose evaluation had failed (not retrained)")
    train_s = time.perf_counter() - t0
    print(f"Done in {train_s:.1f}s: {count_line(c)}  -> {spec.sweep_dir}")
    print_worker_table(outcome.workers)
    from saesweep.cli.results import print_failed, print_frontier

    asked = None if configs is None else {cfg.trial_id for cfg in configs}
    ran = [r for r in recs if asked is None or r.trial_id in asked]
    print_failed(ran)
    why = failure_line(ran)
    if why:
        print(why, file=sys.stderr)
    print_frontier(recs, spec.sweep_dir, baselines=not spec.baselines, objective=spec.search.objectives[0])
    if spec.baselines and not outcome.interrupted and c["complete"]:
        from saesweep.metrics.baselines import for_sweep

        rows = for_sweep(recs, spec.sweep_dir, progress=print)
        from saesweep.metrics import baselines

        print("\n".join(baselines.lines(rows)))
    if outcome.aborted:
        print(f"stopped: {outcome.aborted}", file=sys.stderr)
    if outcome.interrupted:
        print("interrupted: finished trials are recorded; run the same command again to resume", file=sys.stderr)
    return outcome.exit_code


def print_activation_plans(configs: list[ExperimentConfig], pack_size: int) -> None:
    """How each hf source's activations reach the trainer (a ConfigError when the cache cannot
    fit), and, when streaming, what the packs share and what they compute each for themselves."""
    from collections import Counter

    from saesweep import packing
    from saesweep.data.budget import plan_sweep

    plans = plan_sweep(configs)
    for p in plans:
        print(f"activations {p.describe()}")
    if any(p.stream for p in plans):
        per_shape = Counter(packing.pack_key(c) for c in configs if c.source.kind == "hf")
        packs = len(per_shape)
        n_packs = sum(-(-k // max(1, pack_size)) for k in per_shape.values())
        print(f"streaming: the trials of one pack share one LM pass over their training tokens; each of the "
              f"~{n_packs} packs ({packs} pack shapes) runs the LM over its own, so the LM runs ~{n_packs} times "
              f"over the same tokens. Held-out rows and the normalisation prefix are cached once and shared. "
              f"Larger packs (--pack_size) mean fewer LM passes.")
    sys.stdout.flush()


def print_plan(found, slots, pack_size: int, policy: Optional[str] = None) -> None:
    """The devices found, the ones used (and the policy), and the worker plan."""
    from saesweep.devices import detection_lines
    from saesweep.sweep.planning import device_names, plan_lines

    for line in detection_lines(found):
        print(line)
    print(f"\nUsing devices: {device_names(slots)}" + (f"  (policy {policy})" if policy else ""))
    for line in plan_lines(slots, pack_size):
        print(line)
    sys.stdout.flush()


def dry_run(spec, configs, slots, found=None) -> int:
    from saesweep.config.sweep import swept_params
    from saesweep.sweep.planning import deal, distribution_lines

    if configs is None:
        print(f"Would run a {spec.search.method} search: {spec.search.n_trials} trials per type over {spec.sae_types}")
    else:
        print(f"Would run {len(configs)} experiments ({count_by_type(configs)}) in sweep '{spec.name}'")
        print(f"  storage: {redact(spec.storage_url)}   results: {spec.trials_dir}")
        for i, cfg in enumerate(configs[:PREVIEW]):
            fields = list(swept_params(spec, cfg)) if cfg.sae_type in spec.grids else ["lr", "dict_size_ratio", "sparsity_coeff"]
            print(f"  {i + 1}. {cfg.trial_id}  {describe_params(cfg, fields)}")
        if len(configs) > PREVIEW:
            print(f"  ... and {len(configs) - PREVIEW} more")
    print()
    print_plan(found, slots, spec.execution.pack_size)
    if configs is None:
        return EXIT_OK
    ids = [c.trial_id for c in configs]
    if spec.execution.policy == "round_robin":
        assignment = deal(ids, slots)
        print("(round-robin: each device runs exactly these)")
    else:  # dynamic: an estimate, one share per worker; faster devices will take more
        by_slot = {s.name: s.base for s in slots}
        assignment = {tid: by_slot[name] for tid, name in zip(ids, [slots[i % len(slots)].name for i in range(len(ids))])}
        print("(dynamic queue: an even estimate; faster devices will take more)")
    for line in distribution_lines(assignment, slots):
        print(line)
    return EXIT_OK


# ------------------------------------------------------------------------- worker
def worker_args(p):
    flag(p, "storage", required=True,
         help="the sweep's storage: postgresql://USER@HOST/DB (password from ~/.pgpass or PGPASSWORD, or in the URL) "
              "or a journal path")
    flag(p, "sweep", required=True, help="sweep name")
    flag(p, "devices", default="auto", help="devices of this host for workers (default auto)")
    flag(p, "max_parallel", type=positive_int, help="worker processes on this host")
    flag(p, "policy", choices=["dynamic", "round_robin"], default="dynamic")


def cmd_worker(args) -> int:
    from saesweep.config.experiment import parse_config
    from saesweep.config.sweep import ExecutionSpec
    from saesweep.devices import detect
    from saesweep.sweep.display import print_worker_table
    from saesweep.sweep.local import run_workers
    from saesweep.sweep.planning import plan_workers
    from saesweep.sweep.store import WAITING, SweepStore
    from saesweep.sweep.storages import secret_to_env

    # a password in the URL moves to PGPASSWORD (read by libpq): the worker processes then get
    # the URL without it on their command lines, which every user of the host can read
    args.storage = secret_to_env(args.storage)
    found = detect(with_free=False)
    parse_devices_first = plan_workers(args.devices, args.max_parallel, None, None, found=found)  # bad --devices: exit 2 now
    store = SweepStore(args.storage, args.sweep, create=False)
    execution = ExecutionSpec.model_validate(store.info.get("spec", {}).get("execution", {}))
    configs = []
    for t in store.trials([WAITING]):
        try:
            configs.append(parse_config(t.user_attrs["config"]))
        except Exception:
            pass
    slots = plan_workers(args.devices, args.max_parallel, configs, execution, found=found) if configs else parse_devices_first
    print(f"Worker for sweep '{args.sweep}' on {redact(args.storage)}")
    print_plan(found, slots, execution.pack_size, args.policy)
    outcome = run_workers(store, execution, slots, policy=args.policy)
    print_worker_table(outcome.workers)
    return outcome.exit_code
