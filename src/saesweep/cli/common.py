"""What every ``saesweep`` subcommand shares: the parser class, exit codes, flag helpers.

Flags use the classic scripts' spelling (``--output_dir``, ``--max_parallel``); the dashed spelling
(``--output-dir``) is accepted too. Bad input exits with code 2 and a one-line message that
names the flag or field; nothing is started or written.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from saesweep.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Parser(argparse.ArgumentParser):
    commands: dict[str, "Parser"]  # the top-level parser's subcommand parsers

    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        import re

        unknown = re.match(r"unrecognized arguments: (--?[A-Za-z][\w.-]*)(?:[= ]([^-\s]\S*))?", message)
        if unknown and any(a.dest == "set" for a in self._actions):
            field = unknown.group(1).lstrip("-").replace("-", "_")
            message += f" (a config field is set with --set {field}={unknown.group(2) or 'VALUE'})"
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


def parse_overrides(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def set_flag(p: argparse.ArgumentParser, what: str = "field") -> None:
    """``--set FIELD=VALUE`` (repeatable): override a config field, dotted for nested ones."""
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"override a {what}, dotted for nested ones (repeatable): --set train.tokens=100000")


def count_by_type(configs) -> str:
    """``relu: 48, gated: 288``: how many of ``configs`` each SAE type has, in first-seen order."""
    from collections import Counter

    return ", ".join(f"{t}: {n}" for t, n in Counter(cfg.sae_type for cfg in configs).items())


# ------------------------------------------------------------ spec and run flags
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


def positive_floats(value: str) -> list[float]:
    try:
        vals = [float(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {value!r}")
    return vals
