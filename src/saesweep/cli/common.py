"""What every ``saesweep`` subcommand shares: the parser class, exit codes, flag helpers.

Flags use the classic scripts' spelling (``--output_dir``, ``--max_parallel``); the dashed spelling
(``--output-dir``) is accepted too. Bad input exits with code 2 and a one-line message that
names the flag or field; nothing is started or written.
"""

from __future__ import annotations

import argparse
from typing import Sequence

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
