"""Progress bars that show on a terminal and stay quiet otherwise (logs, CI, pipes)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional


def is_terminal() -> bool:
    return sys.stderr.isatty()


class _Quiet:
    def advance(self, n: int = 1) -> None:
        pass

    def set(self, **fields: Any) -> None:
        pass


class _Bar:
    def __init__(self, progress, task, tokens_per_step: int) -> None:
        self.p, self.task, self.k = progress, task, tokens_per_step

    def advance(self, n: int = 1) -> None:
        if n:
            self.p.advance(self.task, n)
            done = int(self.p.tasks[0].completed) * self.k
            self.p.update(self.task, tok=si(done))

    def set(self, **fields: Any) -> None:
        self.p.update(self.task, **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in fields.items()})


def si(n: float, spec: str = ".1f") -> str:
    """``n`` with an SI suffix (``1.5M``, ``12.0K``), the mantissa formatted by ``spec``; below a
    thousand, as it is."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:{spec}}{unit}"
    return f"{n:g}" if isinstance(n, float) and not float(n).is_integer() else str(int(n))


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, enabled: Optional[bool] = None, tokens_per_step: int = 1) -> Iterator[Any]:
    """A bar over ``total`` steps showing tokens, loss and L0; a no-op when not on a terminal."""
    if enabled is None:
        enabled = is_terminal()
    if not enabled:
        yield _Quiet()
        return
    with rich_progress("{task.fields[tok]} tok  loss {task.fields[loss]}  L0 {task.fields[l0]}", elapsed=False) as p:
        task = p.add_task(description, total=total, tok="0", loss="-", l0="-")
        yield _Bar(p, task, tokens_per_step)


def rich_progress(*fields: str, elapsed: bool = True) -> Any:
    """The one bar layout of every saesweep bar, on stderr: description, bar, done/total, the
    given text columns (rich templates such as ``"{task.fields[detail]}"``), elapsed and
    remaining time. A context manager (rich's ``Progress``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields)]
    if elapsed:
        columns.append(TimeElapsedColumn())
    return Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True))
