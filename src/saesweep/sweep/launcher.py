"""The launcher contract: where a sweep's workers run.

A worker needs nothing but the store's URL and the sweep's name: it claims packs, trains them and
records results through the store (:mod:`.worker`). So a launcher only has three things to do:

* :meth:`Launcher.describe`: say what it would start, without starting anything (a dry run);
* :meth:`Launcher.start`: start the workers against a sweep's store; it returns :class:`Launched`;
* :meth:`Launched.wait`: block until they end, and give an exit code (0 when every worker ended
  well, 1 when one did not, 130 when interrupted).

Two launchers implement it: :class:`.local.LocalLauncher` (one worker per device slot of this
machine: ``saesweep sweep``) and :class:`.slurm.SlurmLauncher` (a job array through submitit:
``saesweep launch``). A new one (Kubernetes, Ray, ...) is one class in its own module; the
workers, the store and the reporting need no change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saesweep.sweep.store import SweepStore


class Launched(ABC):
    """Workers a launcher started."""

    #: their ids as the user sees them (process ids, job ids)
    ids: list[str]

    @abstractmethod
    def wait(self) -> int:
        """Block until every worker has ended; 0 when all ended well, 1 when one did not, 130 when
        the wait was interrupted."""


class Launcher(ABC):
    """Starts a sweep's workers somewhere."""

    #: where the workers run, in words ("this machine", "Slurm")
    where: str

    @abstractmethod
    def describe(self, store_url: str, sweep: str) -> list[str]:
        """What :meth:`start` would start, as lines for the user; starts nothing."""

    @abstractmethod
    def start(self, store: SweepStore) -> Launched:
        """Start the workers on ``store``'s sweep."""
