"""The ``saesweep`` command: the table of subcommands and the entry point.

Flags use the classic scripts' spelling (``--output_dir``, ``--max_parallel``); the dashed spelling
(``--output-dir``) is accepted too. Bad input exits with code 2 and a one-line message that
names the flag or field; nothing is started or written. Nothing here imports torch: each
command's module imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, NamedTuple, Optional, Sequence

from saesweep.settings import env
from saesweep.version import __version__
from saesweep.cli import cache, launch, report, results, sweep, train
from saesweep.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Parser
from saesweep.errors import ConfigError
from saesweep.training.allocator import tune_allocator


class Command(NamedTuple):
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


#: every subcommand, in the order ``saesweep --help`` lists them
COMMANDS: dict[str, Command] = {
    "train": Command("train, evaluate and save one SAE from a config YAML", train.train_args, train.cmd_train),
    "grid": Command("show the sweep's grids and how many experiments they make", sweep.grid_args, sweep.cmd_grid),
    "generate": Command("write one readable config YAML per experiment (approach 1)",
                        sweep.generate_args, sweep.cmd_generate),
    "run": Command("run a folder of config YAMLs through the sweep engine, skipping finished ones",
                   sweep.run_args, sweep.cmd_run),
    "sweep": Command("run the sweep in memory: expand the grids and train (approach 3)",
                     sweep.sweep_args, sweep.cmd_sweep),
    "worker": Command("join a sweep from this host: claim and run its trials", sweep.worker_args, sweep.cmd_worker),
    "status": Command("summarise a sweep's progress", results.sweep_ref_args, results.cmd_status),
    "results": Command("export every trial's params and metrics as CSV and Parquet",
                       results.results_args, results.cmd_results),
    "baseline": Command("score random baselines (random decoder, random firing, PCA) beside the sweep's trials",
                        results.baseline_args, results.cmd_baseline),
    "devices": Command("list the devices saesweep can use", cache.devices_args, cache.cmd_devices),
    "cache": Command("list, verify, remove or warm (build ahead) cached activations",
                     cache.cache_args, cache.cmd_cache),
    "report": Command("write the sweep's HTML report and PNGs: Pareto frontier, importance, devices, trials",
                      report.report_args, report.cmd_report),
    "importance": Command("hyperparameter importance per SAE type for a metric, as JSON",
                          report.importance_args, report.cmd_importance),
    "dashboard": Command("open optuna-dashboard on the sweep's storage (http://127.0.0.1:PORT)",
                         report.dashboard_args, report.cmd_dashboard),
    "wandb-sweep": Command("W&B sweep from the spec's grid: YAML, agent program, and the sweep itself when logged in",
                           report.wandb_sweep_args, report.cmd_wandb_sweep),
    "verify": Command("check every file of a run or sweep folder: checksums of weights and checkpoints, JSON, logs, "
                      "the journal", report.verify_args, report.cmd_verify),
    "launch": Command("submit sweep workers as a Slurm job array (submitit); requeued on preemption",
                      launch.launch_args, launch.cmd_launch),
}


def build_parser() -> Parser:
    p = Parser(prog="saesweep", description="Train sparse autoencoders and sweep their hyperparameters.")
    p.add_argument("--version", action="version", version=f"saesweep {__version__}")
    p.add_argument("--debug", action="store_true", help=f"a traceback instead of one line on an unexpected error "
                                                        f"(also: {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    p.commands = {}
    for name, cmd in COMMANDS.items():
        sp = p.commands[name] = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_args(sp)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="a traceback instead of one line on an unexpected error")
        sp.set_defaults(handler=cmd.handler)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own parser says it, with its hints
        parser.commands.get(getattr(args, "command", None) or "", parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    tune_allocator()
    debug = bool(getattr(args, "debug", False) or env(DEBUG_ENV))
    try:
        _warn_password_in_argv(args)
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"saesweep {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if debug:
            raise
        print(f"saesweep {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED


#: set (to anything) for a traceback instead of one line when a command fails unexpectedly
DEBUG_ENV = "SAESWEEP_DEBUG"


def one_line(e: BaseException) -> str:
    """What a failure underneath saesweep (an OS error on a path the user gave, a library's own
    error) says, in one line: a full disk, the file and the OS's reason, or the error's type and
    first line, and how to see the traceback."""
    chain, seen = [], set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:  # the error and what caused it, innermost last
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    full = next((c for c in chain if isinstance(c, OSError) and c.errno == errno.ENOSPC), None)
    if full is not None:
        where = next((c.filename for c in chain if isinstance(c, OSError) and c.filename), None)
        return f"disk full ({where or 'a write'}); nothing partial was kept: free some space and run again"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or type(e).__name__}"
    text = str(e).strip().splitlines()
    first = text[0][:300] if text else ""
    return f"{type(e).__name__}: {first} ({DEBUG_ENV}=1 or --debug shows the traceback)"


def _warn_password_in_argv(args: argparse.Namespace) -> None:
    """A password typed in --storage stays readable in this process's command line (``ps``) for as
    long as it runs; the processes saesweep starts get it through PGPASSWORD, never on theirs."""
    from saesweep.sweep.storages import split_secret

    storage = getattr(args, "storage", None)
    if isinstance(storage, str) and storage and split_secret(storage)[1]:
        print("saesweep: warning: the password in --storage is visible in this command's line to every user of "
              "this host (ps) while it runs; keep it in ~/.pgpass or the PGPASSWORD environment variable and leave "
              "it out of the URL", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
