"""``saesweep launch``: a job array of sweep workers on Slurm (or on this machine), via submitit."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from saesweep.cli.common import EXIT_OK, count_by_type, count_int, flag, positive_int
from saesweep.errors import ConfigError


def _minutes(value: str) -> int:
    """--time: minutes (90), or Slurm's [D-]HH:MM[:SS] (1-12:00:00, 24:00:00)."""
    v = str(value).strip()
    if re.fullmatch(r"\d+", v):
        n = int(v)
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", v)
        if not m:
            raise argparse.ArgumentTypeError(f"expected minutes (90) or [D-]HH:MM[:SS] (24:00:00), got {value!r}")
        d, h, mi, s = (int(x) if x else 0 for x in m.groups())
        n = d * 1440 + h * 60 + mi + (1 if s else 0)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 minute, got {value!r}")
    return n


def _key_value(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its dashes), got {value!r}")
    k, v = value.split("=", 1)
    return k.strip().lstrip("-").replace("-", "_"), v.strip()


def launch_args(p: argparse.ArgumentParser) -> None:
    from saesweep.cli.common import spec_flags

    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--slurm", dest="cluster", action="store_const", const="slurm",
                       help="submit a Slurm job array (sbatch) through submitit")
    where.add_argument("--local", dest="cluster", action="store_const", const="local",
                       help="run the same job array on this machine with submitit's local executor (to try it out)")
    flag(p, "storage", help="the sweep's storage: postgresql://... (shared by every node), or a journal file on a "
                            "shared filesystem; default with --spec: the spec's")
    flag(p, "sweep", help="sweep name (default with --spec: the spec's name)")
    spec_flags(p)
    g = p.add_argument_group("job array")
    flag(g, "array", type=positive_int, default=1, help="tasks in the job array (default 1); each is one allocation")
    flag(g, "max_concurrent", type=positive_int, help="most tasks running at once (sbatch --array=...%%K)")
    flag(g, "partition", help="Slurm partition")
    flag(g, "gpus_per_task", type=count_int, default=0, help="GPUs per task (default 0); the task runs one worker per GPU")
    flag(g, "cpus_per_task", type=positive_int, help="CPU cores per task")
    flag(g, "mem", help="memory per task: 32G, 500M, or GB as a number")
    flag(g, "time", type=_minutes, default=24 * 60,
         help="time limit per task: minutes, or [D-]HH:MM[:SS] (default 24:00:00); a task out of time checkpoints "
              "its packs and is requeued")
    flag(g, "devices", default="auto", help="devices for the workers inside a task (default auto: the task's GPUs)")
    flag(g, "max_parallel", type=positive_int, help="worker processes per task (default: one per device)")
    flag(g, "folder", help="folder for job files and logs; %%j is the job id (default slurm_logs/<sweep>/%%j)")
    flag(g, "job_name", help="job name (default saesweep-<sweep>)")
    flag(g, "account", help="Slurm account")
    flag(g, "qos", help="Slurm quality of service")
    flag(g, "constraint", help="Slurm node constraint")
    flag(g, "setup", action="append", default=[], metavar="LINE",
         help="shell line run in the job before the workers, e.g. 'module load cuda' (repeatable)")
    flag(g, "slurm_arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
         help="any other sbatch option, e.g. --slurm_arg gres=gpu:a100:2 (repeatable)")
    flag(g, "signal_delay_s", type=positive_int, default=120,
         help="seconds before the time limit at which Slurm signals the task to checkpoint (default 120)")
    flag(g, "max_requeues", type=count_int, default=10, help="time-outs after which a task is not requeued (default 10)")
    flag(p, "dry_run", action="store_true", help="print the submitit parameters and sbatch script; submit nothing")
    flag(p, "wait", action="store_true", help="wait for the tasks to end and report them")


def cmd_launch(args) -> int:
    from saesweep.sweep.slurm import LaunchOptions, SlurmLauncher, absolute_storage, parse_mem, split_password
    from saesweep.sweep.urls import redact

    spec = None
    uses_spec = bool(args.spec or args.sae_types or args.limit or args.set)
    if uses_spec:
        from saesweep.cli.common import spec_from_args

        spec = spec_from_args(args, name=args.sweep, storage=args.storage,
                              **{"execution.devices": None, "execution.max_parallel": None})
    storage = args.storage or (spec.storage_url if spec is not None else None)
    sweep = args.sweep or (spec.name if spec is not None else None)
    if not storage or not sweep:
        raise ConfigError("launch: give --storage and --sweep (or --spec to create the sweep)")
    storage = absolute_storage(storage)
    bare, password = split_password(storage)
    opts = LaunchOptions(
        storage=bare, sweep=sweep, cluster=args.cluster, array=args.array, max_concurrent=args.max_concurrent,
        partition=args.partition, gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
        mem_gb=parse_mem(args.mem) if args.mem else None, time_min=args.time, devices=args.devices,
        max_parallel=args.max_parallel, folder=args.folder or str(Path("slurm_logs") / sweep / "%j"),
        job_name=args.job_name, account=args.account, qos=args.qos, constraint=args.constraint,
        setup=list(args.setup), slurm_args=dict(args.slurm_arg), signal_delay_s=args.signal_delay_s,
        max_requeues=args.max_requeues,
    )
    launcher = SlurmLauncher(opts, password=password)
    if "://" not in storage and opts.cluster == "slurm":
        print(f"note: {storage} is a journal file: every node must see it on a shared filesystem whose file locks "
              "work across nodes; PostgreSQL is the safe choice for many nodes", file=sys.stderr)
    if args.dry_run:
        if spec is not None:
            print(f"Would queue the trials of sweep '{spec.name}' (spec {args.spec or 'built-in'}) first")
        for line in launcher.describe(storage, sweep):
            print(line)
        if password is not None:
            print("  the password is not in any job file: it reaches the jobs as PGPASSWORD in their environment "
                  "(or keep it in ~/.pgpass on the cluster and leave it out of the URL)")
        return EXIT_OK

    from saesweep.sweep.store import SweepStore

    if spec is not None:
        from saesweep.config.sweep import expand
        from saesweep.sweep.worker import open_sweep, queue_trials

        store = open_sweep(spec.model_copy(update={"storage": storage}))
        if spec.search.is_grid:
            configs = expand(spec)
            added = queue_trials(store, spec, configs)
            print(f"Sweep '{spec.name}': {len(configs)} experiments ({count_by_type(configs)}); {added} new")
        else:
            print(f"Sweep '{spec.name}': a {spec.search.method} search; the workers sample its trials")
    else:
        store = SweepStore(storage, sweep, create=False)  # it exists, and this host reaches it
    c = store.counts()
    print(f"Sweep '{sweep}' on {redact(storage)}: {c['waiting']} waiting, {c['running']} running, "
          f"{c['complete']} complete, {c['failed']} failed")
    launched = launcher.start(store)
    ids = launched.ids
    print(f"Submitted {len(ids)} worker task(s) to {launcher.where}: {', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}")
    print(f"  logs: {Path(opts.folder).parent if '%j' in opts.folder else opts.folder}")
    print(f"  follow: saesweep status {sweep} --storage '{redact(storage)}'")
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    code = launched.wait()
    c = store.counts()
    print(f"Sweep '{sweep}': {c['complete']} complete, {c['failed']} failed, {c['waiting']} waiting, {c['running']} running")
    return code
