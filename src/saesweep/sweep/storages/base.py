"""The contract every sweep storage meets: one :class:`Backend` subclass per kind, in its own
module. :class:`saesweep.sweep.store.SweepStore` keeps trials in the backend's Optuna storage
and asks the backend, never the URL, for everything that differs between kinds:

* :meth:`Backend.lock` -- a sweep-wide mutex for rare multi-step updates (populating a sweep,
  budgeted sampling), released when its holder dies;
* :attr:`Backend.server_clock` / :meth:`Backend.server_time` -- whether leases are measured on
  the storage server's clock (many hosts) or on this host's ``time.time()``;
* :attr:`Backend.liveness_locks` -- whether a worker proves it is alive by holding a file lock
  beside the storage (then it writes no heartbeats);
* :meth:`Backend.is_retryable` -- which errors are a lost connection that a worker waits out
  rather than dies of;
* :attr:`Backend.concurrent_workers` -- whether several workers may claim from it at once;
* :meth:`Backend.split_secret` -- the URL without its secret and the environment variables that
  carry it (:attr:`Backend.secret_env` names the one a password goes in): local workers, Slurm
  jobs and child processes get those, never the secret on a command line.

``tests/sweep/test_storage_conformance.py`` runs the same checks over every backend.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

from saesweep.errors import ConfigError


class Backend:
    """One opened storage: ``url``, the file for the file-based kinds (``path``) and the Optuna
    storage (``storage``)."""

    #: the kind's short name (status output, the store's ``kind``)
    kind: ClassVar[str]
    #: its name in messages
    title: ClassVar[str]
    #: several workers (processes, hosts) may claim from it at the same time
    concurrent_workers: ClassVar[bool] = True
    #: leases are measured on the storage server's clock (:meth:`server_time`)
    server_clock: ClassVar[bool] = False
    #: a worker's liveness is a file lock it holds beside the storage
    liveness_locks: ClassVar[bool] = False
    #: the environment variable its password can travel in instead of the URL
    secret_env: ClassVar[Optional[str]] = None

    def __init__(self, url: str, path: Optional[Path], storage: Any) -> None:
        self.url, self.path, self.storage = url, path, storage

    @classmethod
    def accepts(cls, url: str) -> bool:
        """Whether ``url`` names a storage of this kind."""
        raise NotImplementedError

    @classmethod
    def split_secret(cls, url: str) -> tuple[str, dict[str, str]]:
        """``(url without its secret, {environment variable: secret})``: what worker processes
        and jobs get instead of the full URL, so that no secret is on a command line (where every
        user of the host can read it). By default a URL holds no secret."""
        return url, {}

    @classmethod
    def check(cls, url: str) -> None:
        """A ConfigError naming ``--storage`` when ``url`` cannot work, found without opening
        anything (a dry run checks this); by default nothing is checked."""

    @classmethod
    def open(cls, url: str, *, create: bool = True, read_only: bool = False) -> "Backend":
        """Open (with ``create``, create) the storage ``url`` names; a ConfigError naming
        ``--storage`` when it cannot be. With ``read_only`` the opening writes nothing (a
        command that only reads, such as ``status``, never repairs or changes the storage)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the sweep ``name``'s mutex for the block."""
        raise NotImplementedError
        yield  # pragma: no cover

    def server_time(self) -> tuple[float, float]:
        """(the server's epoch seconds, this host's monotonic time at the same instant); only
        for a backend with ``server_clock``."""
        raise NotImplementedError(f"{self.kind} storage has no server clock")

    def is_retryable(self, error: BaseException) -> bool:
        """Whether ``error`` is a lost connection to wait out (the default: nothing is)."""
        return False


class Unreachable(ConfigError):
    """The store's server could not be reached when the store was opened (down, restarting, or a
    wrong address): a command refuses it by name, a worker may wait for it."""


def lock_file(path: Optional[Path], name: str) -> str:
    """The lock file beside a file-backed store for the lock ``name``: one for the whole file (the
    sweep-wide lock, whatever the sweep), one per purpose after a colon (``sweep:claims``)."""
    purpose = name.split(":", 1)[1] if ":" in name else ""
    return f"{path}.saesweep{'-' + purpose if purpose else ''}-lock"
