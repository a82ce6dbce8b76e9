"""Sweep subcommands: grid, generate, run, sweep, worker, status, results, devices, cache.

All of them expand the one sweep spec (:mod:`saesweep.config.sweep`) and run through the one
engine (:mod:`saesweep.sweep.worker`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from saesweep.cli.common import EXIT_OK, count_by_type, flag, parse_overrides, positive_int, set_flag
from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig, load_config
from saesweep.io import atomic_write_text, ensure_folder
from saesweep.sweep.urls import redact

PREVIEW = 5


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def spec_flags(p: argparse.ArgumentParser, *, types: bool = True) -> None:
    flag(p, "spec", help="sweep spec YAML (default: ./saesweep.yaml if present, else the default grids)")
    if types:
        flag(p, "sae_types", type=csv_list, help="comma-separated SAE types (default: all in the spec)")
    flag(p, "limit", type=positive_int, help="only the first N experiments")
    set_flag(p, "base config field for every trial")


def run_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "max_parallel", type=positive_int,
         help="worker processes (default: one per device, up to 2 per GPU when the largest pack fits twice)")
    flag(p, "devices", help="auto | cuda:0,cuda:1,cpu | cpu:0,cpu:1 | cpu:0=4,cpu:1=4 (K=T: T threads); "
                            "default from the spec: auto = every GPU, else MPS, else the CPU")
    flag(p, "policy", choices=["dynamic", "round_robin"],
         help="dynamic: each device pulls the next pack when free (default); round_robin: trials dealt to devices up front")
    flag(p, "pack_size", type=positive_int, help="most trials trained together (1 = no packing)")
    flag(p, "dry_run", action="store_true", help="print what would run and where, and touch nothing")
    flag(p, "retry_failed", action="store_true",
         help="also give a fresh attempt to the trials that failed for good (retries spent, diverged, out of "
              "memory everywhere); a plain re-run resumes interrupted trials and skips complete and failed ones")
    flag(p, "show_devices", action="store_true", help="list the devices found and exit")
    flag(p, "name", help="sweep name (default: the spec's)")
    flag(p, "storage", help="journal file, postgresql://... (default: <output_dir>/<name>/sweep.journal)")
    flag(p, "output_dir", help="where sweeps keep their results (default: runs)")
    flag(p, "wandb", action="store_true", default=None,
         help="log every trial to W&B (online when logged in, else offline; WANDB_MODE wins)")
    flag(p, "wandb_project", help="W&B project (default: the spec's tracking.project)")


def spec_from_args(args: argparse.Namespace, **extra: Any):
    from saesweep.config.sweep import load_spec

    name = getattr(args, "name", None)
    if name is not None:
        import re

        from saesweep.config.sweep import NAME_PATTERN

        if not re.fullmatch(NAME_PATTERN, name) or len(name) > 100:
            raise ConfigError(f"--name {name[:40]!r}{'...' if len(name) > 40 else ''}: a sweep name has at most 100 "
                              "characters: letters, digits and . _ + -, starting with a letter or digit")
    if getattr(args, "storage", None) == "":
        raise ConfigError("--storage: empty; give a journal file path, postgresql://... or sqlite:///..., "
                          "or leave the flag out for the sweep folder's journal")
    overrides: dict[str, Any] = {
        "sae_types": getattr(args, "sae_types", None),
        "limit": getattr(args, "limit", None),
        "name": getattr(args, "name", None),
        "storage": getattr(args, "storage", None),
        "output_dir": getattr(args, "output_dir", None),
        "execution.max_parallel": getattr(args, "max_parallel", None),
        "execution.devices": getattr(args, "devices", None),
        "execution.policy": getattr(args, "policy", None),
        "execution.pack_size": getattr(args, "pack_size", None),
        "tracking.wandb": True if getattr(args, "wandb", None) else None,
        "tracking.project": getattr(args, "wandb_project", None),
        **extra,
    }
    for k, v in parse_overrides(getattr(args, "set", [])).items():
        overrides[f"base.{k}"] = v
    try:
        return load_spec(getattr(args, "spec", None), **overrides)
    except ConfigError as e:  # a value a flag gave is named by its flag, not by the spec file
        text = str(e)
        for field, flag_name in FLAG_OF_FIELD.items():
            if overrides.get(field) is not None and f": {field}:" in text:
                raise ConfigError(f"--{flag_name} {overrides[field]}:" + text.split(f": {field}:", 1)[1]) from None
        raise


#: the spec fields the run flags set, by flag
FLAG_OF_FIELD = {"execution.max_parallel": "max_parallel", "execution.pack_size": "pack_size",
                 "execution.devices": "devices", "execution.policy": "policy", "limit": "limit",
                 "tracking.project": "wandb_project", "output_dir": "output_dir", "storage": "storage"}


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
        return cmd_devices(args)
    plan = plan_sweep(spec, configs, with_free=bool(args.dry_run))
    if args.dry_run:
        return dry_run(spec, configs, plan.slots, plan.found)
    from saesweep.sweep.display import print_worker_table

    if configs is not None:  # before anything is written: the activations must fit on the disk
        print_activation_plans(configs, spec.execution.pack_size)
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
    ran = [r for r in recs if configs is None or r.trial_id in {cfg.trial_id for cfg in configs}]
    _print_failed(ran)
    why = failure_line(ran)
    if why:
        print(why, file=sys.stderr)
    _print_frontier(recs, spec.sweep_dir, baselines=not spec.baselines, objective=spec.search.objectives[0])
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
    from saesweep.sweep.urls import password_to_env

    # a password in the URL moves to PGPASSWORD (read by libpq): the worker processes then get
    # the URL without it on their command lines, which every user of the host can read
    args.storage = password_to_env(args.storage)
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


# ------------------------------------------------------------------ status / results
def sweep_ref_args(p):
    p.add_argument("sweep", help="sweep name (under --output_dir), sweep folder, or name with --storage")
    flag(p, "storage", help="storage URL (default: the sweep folder's journal)")
    flag(p, "output_dir", default="runs", help="where sweeps keep their results (default: runs)")


def open_existing(args):
    """(store, sweep folder) for a sweep named on the command line, opened read-only."""
    from saesweep.sweep.store import SweepStore

    ref = Path(args.sweep)
    if args.storage:
        store = SweepStore(args.storage, args.sweep, create=False, read_only=True)
        return store, Path(args.output_dir) / args.sweep
    for folder in (ref, Path(args.output_dir) / args.sweep):
        journal = folder / "sweep.journal"
        if journal.exists():
            import optuna

            from saesweep.sweep.storages import open_backend

            names = [s.study_name for s in optuna.get_all_study_summaries(
                open_backend(str(journal), create=False, read_only=True).storage)]
            name = folder.name if folder.name in names else (names[0] if names else folder.name)
            return SweepStore(str(journal), name, create=False, read_only=True), folder
    raise ConfigError(f"sweep {args.sweep!r}: no sweep folder with a sweep.journal at {ref} or {Path(args.output_dir) / args.sweep}; "
                      "give --storage for a database")


def cmd_status(args) -> int:
    from collections import Counter, defaultdict

    store, folder = open_existing(args)
    recs = store.records()
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        by_type[r.sae_type][r.state] += 1
    total = Counter(r.state for r in recs)
    print(f"Sweep '{store.name}' ({len(recs)} trials)  [{folder}]")
    print(f"  {'type':<22}{'complete':>9}{'running':>9}{'waiting':>9}{'failed':>8}")
    for t, c in by_type.items():
        print(f"  {t:<22}{c['complete']:>9}{c['running']:>9}{c['waiting']:>9}{c['failed']:>8}")
    print(f"  {'all':<22}{total['complete']:>9}{total['running']:>9}{total['waiting']:>9}{total['failed']:>8}")
    from saesweep.sweep.store import count_line, failure_line, tally

    print(f"  {count_line(tally(recs))}")
    why = failure_line(recs)
    if why:
        print(f"  {why}")
    durations = [r.duration_s for r in recs if r.state == "complete" and r.duration_s]
    left = total["waiting"] + total["running"]
    if durations and left:
        # a trial's duration is its pack's: packs of pack_size run side by side on the slots
        info = store.info
        pack = int(((info.get("spec") or {}).get("execution") or {}).get("pack_size") or 1)
        slots = max(1, len(info.get("slots") or []) or 1)
        mean = sum(durations) / len(durations)
        packs = -(-left // pack)
        print(f"  mean trial (pack) time {mean:.1f}s; {left} trials left in about {packs} pack(s) of up to {pack} "
              f"on {slots} slot(s): about {mean * -(-packs // slots):.0f}s")
    _print_failed(recs)
    ckpt_dir = Path(store.info.get("checkpoint_dir", folder / "checkpoints"))
    held = list(ckpt_dir.glob("*.safetensors")) if ckpt_dir.is_dir() else []
    if held:
        size = sum(f.stat().st_size for f in held)
        print(f"  checkpoints of interrupted packs: {len(held)} file(s), {size / 2**20:.1f} MiB in {ckpt_dir} "
              "(resumed by the next run, removed when the sweep completes)")
    from saesweep.sweep.display import per_slot_totals, print_worker_table

    print_worker_table(per_slot_totals(store))
    _print_frontier(recs, folder, objective=(store.info.get("objectives") or ["fvu"])[0])
    return EXIT_OK


def _print_failed(recs) -> None:
    for r in recs:
        if r.state == "failed":
            print(f"  failed {r.trial_id} after {r.attempts} attempt(s): {r.reason}")


def _print_frontier(recs, folder, *, baselines: bool = True, objective: str = "fvu") -> None:
    """The sweep's summary: matched L0s, frontiers, misses, degenerate SAEs, the trial to pick
    per type, and (``baselines``) the baselines saved in its folder."""
    from saesweep.metrics import baselines as base
    from saesweep.reporting.pick import pick_lines
    from saesweep.reporting.table import degenerate_lines, frontier_lines, results_table

    from saesweep.reporting.matched import matched_lines, missed_lines

    df = results_table(recs)
    lines = matched_lines(df) + frontier_lines(df)
    if lines:
        saved = base.lines(base.read(folder)) if baselines else []
        print("\n".join(lines + missed_lines(df) + degenerate_lines(df) + pick_lines(df, objective) + saved))
        print(f"Next: saesweep results {folder}   (CSV + Parquet)   saesweep report {folder}   (plots)")
    sys.stdout.flush()


def results_args(p):
    sweep_ref_args(p)
    flag(p, "output", help="file path without extension (default: <sweep folder>/results)")


def cmd_results(args) -> int:
    from saesweep.reporting.table import results_table, write_table

    store, folder = open_existing(args)
    df = results_table(store)
    stem = Path(args.output) if args.output else folder / "results"
    ensure_folder(stem.parent, "--output" if args.output else "the sweep folder")
    try:
        paths = write_table(df, stem)
    except OSError as e:  # a full disk, a read-only file system: no partial file is left
        raise ConfigError(f"{'--output ' + str(args.output) if args.output else stem}: cannot write ({e.strerror})") from None
    print(f"{len(df)} trials -> " + ", ".join(str(p) for p in paths))
    from saesweep.metrics.baselines import lines, read

    rows = read(folder)
    if rows:
        import pandas as pd

        out = stem.with_name(stem.name + "_baselines.csv")
        table = pd.DataFrame(rows)
        lead = [c for c in ("baseline", "target_l0", "l0", "fvu", "feature_f1") if c in table]
        atomic_write_text(out, table[lead + sorted(set(table) - set(lead))].to_csv(index=False))
        print("\n".join(lines(rows)) + f"\n  -> {out}")
    return EXIT_OK


def positive_floats(value: str) -> list[float]:
    try:
        vals = [float(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {value!r}")
    return vals


def baseline_args(p):
    from saesweep.metrics.registry import BASELINES as KINDS

    sweep_ref_args(p)
    flag(p, "l0", type=positive_floats, help="comma-separated L0s to compare at (default: three spread over the "
         "trials' L0s)")
    flag(p, "kinds", type=csv_list, help=f"comma-separated baselines (default: all: {', '.join(KINDS)})")


def cmd_baseline(args) -> int:
    from saesweep.metrics.baselines import FILE, KINDS, for_sweep, lines

    kinds = args.kinds or list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"--kinds: unknown baseline {bad[0]!r}; choose from {', '.join(KINDS)}")
    store, folder = open_existing(args)
    rows = for_sweep(store.records(), folder, args.l0, kinds, progress=print)
    if not rows:
        raise ConfigError(f"sweep {args.sweep!r}: no complete trial to take the source and width from; "
                          "run the sweep first")
    print("\n".join(lines(rows)))
    print(f"-> {folder / FILE}   (saesweep results and saesweep report show them beside the trials)")
    return EXIT_OK


# -------------------------------------------------------------------- devices / cache
def devices_args(p):
    pass


def cmd_devices(args) -> int:
    from saesweep.devices import detect, parse_devices

    found = detect()
    for d in found:
        print(d.line())
    print(f"\n--devices auto uses: {[s.name for s in parse_devices('auto', found)]}")
    return EXIT_OK


def cache_args(p):
    p.add_argument("action", choices=["ls", "rm", "verify", "warm"],
                   help="ls | rm KEYS | verify [KEYS] | warm: build the entries a sweep (--spec) or a config (--config) needs")
    p.add_argument("keys", nargs="*", help="entries to remove or verify (default for verify: all)")
    flag(p, "all", action="store_true", help="with rm: remove every entry")
    flag(p, "cache_dir", help="cache folder (default: the configs' cache_dir, else $SAESWEEP_CACHE or ~/.cache/saesweep)")
    spec_flags(p)
    flag(p, "config", help="with warm: an experiment config YAML instead of a sweep spec")
    flag(p, "device", default="auto", help="with warm: device of the language model (default auto)")


def cmd_cache(args) -> int:
    from saesweep.data import cache, cache_build

    if args.action == "warm":  # build every entry the trials need, here and now (hosts with cache_mode: wait only read)
        from saesweep.training.trainer import resolve_device

        if args.config:
            configs = [load_config(args.config)]
            updates = parse_overrides(args.set)
            if updates:
                configs = [configs[0].with_updates(**updates)]
        else:
            from saesweep.config.sweep import expand

            spec = spec_from_args(args)
            configs = [spec.base_config(t) for t in spec.sae_types] if not spec.search.is_grid else expand(spec)
        if args.cache_dir:
            configs = [c.with_updates(cache_dir=str(args.cache_dir)) for c in configs]
        hf_configs = [c for c in configs if c.source.kind == "hf"]
        if not hf_configs:
            print("nothing to warm: these trials use synthetic activations, which are not cached")
            return EXIT_OK
        for e in cache_build.warm(hf_configs, device=resolve_device(args.device), progress=None):
            what = "built" if e["built"] else "already cached"
            print(f"{e['key']}  {what}: {e['model']}  {e['hook']}  {e['dataset']}  {e['tokens']:,} tokens  "
                  f"({e['seconds']}s)  -> {e['path']}")
        return EXIT_OK
    root = cache.cache_root(args.cache_dir)
    if args.action == "ls":
        entries = cache.list_entries(root)
        if not entries:
            print(f"no cached activations in {root}")
        for e in entries:
            print(f"{e['key']}  {e['model']}  {e['hook']}  {e['dataset']}  {e['tokens']:,} tokens  "
                  f"{e['size_bytes'] / 2**20:.1f} MiB")
        return EXIT_OK
    if args.action == "rm":
        if not args.keys and not args.all:
            raise ConfigError("cache rm: name the keys to remove, or --all")
        removed = cache.remove_entries(root, "all" if args.all else args.keys)
        print(f"removed {len(removed)} entries from {root}")
        return EXIT_OK
    bad = [e["key"] for e in cache.list_entries(root) if (not args.keys or e["key"] in args.keys)
           and not cache.verify_entry(root / "activations" / e["key"])]
    print("all entries verify" if not bad else f"corrupt: {', '.join(bad)}")
    return EXIT_OK if not bad else 1
