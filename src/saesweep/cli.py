"""The ``saesweep`` command.

Flags use the seed's spelling (``--output_dir``, ``--max_parallel``); the dashed spelling
(``--output-dir``) is accepted too. Bad input exits with code 2 and a one-line message that
names the flag or field; nothing is started or written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from .config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def count_int(value: str) -> int:
    """argparse type: a whole number, 0 or more."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def positive_int(value: str) -> int:
    """argparse type: a whole number, 1 or more."""
    n = count_int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """Add ``--name_with_underscores`` with a ``--name-with-dashes`` alias."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    p.add_argument(*names, dest=name, **kw)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments; returns the handler."""

    def deco(add_args: Callable[[argparse.ArgumentParser], None]):
        def with_handler(handler: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (help, add_args, handler)
            return handler

        return with_handler

    return deco


def build_parser() -> Parser:
    from . import __version__

    p = Parser(prog="saesweep", description="Train sparse autoencoders and sweep their hyperparameters.")
    p.add_argument("--version", action="version", version=f"saesweep {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (help, add_args, handler) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        add_args(sp)
        sp.set_defaults(handler=handler)
    return p


# ------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config YAML")
    flag(p, "device", help="override train.device (auto, cpu, cuda, cuda:N, mps)")
    flag(p, "output_dir", help="override output_dir")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field, dotted for nested ones (repeatable): --set train.tokens=100000")


def parse_overrides(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@command("train", "train, evaluate and save one SAE from a config YAML")(_train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiment import run

    cfg = load_config(args.config)
    updates = parse_overrides(args.set)
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    if args.device:
        updates["train.device"] = args.device
    if updates:
        cfg = cfg.with_updates(**updates)
    if cfg.source.kind == "hf":
        from .activations.hf import check_source

        check_source(cfg.source)
    result = run(cfg)
    if not result.ok:
        print(f"{result.trial_id}: failed: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    m = result.metrics
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in ("fvu", "l0", "dead_fraction", "ce_loss_score", "frac_recovered") if k in m)
    print(f"{result.trial_id}: {shown}\n  -> {result.run_dir}")
    return EXIT_OK


# -------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    _load_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
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


def _load_commands() -> None:
    """Import the modules that register further subcommands."""
    import importlib

    for mod in ("cli_sweep", "cli_report", "cli_launch"):
        try:
            importlib.import_module(f"saesweep.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"saesweep.{mod}":
                raise


if __name__ == "__main__":
    sys.exit(main())
