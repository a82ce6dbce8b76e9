"""``sqlite:///PATH`` -- Optuna's RDB storage on SQLite, for a single worker: SQLite does not
give the row locks that concurrent claiming needs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import optuna

from saesweep.io import file_lock
from saesweep.sweep.storages.base import Backend, lock_file


class SQLiteBackend(Backend):
    kind, title = "sqlite", "SQLite"
    concurrent_workers = False

    @classmethod
    def accepts(cls, url: str) -> bool:
        return url.startswith("sqlite:///")

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> "SQLiteBackend":
        return cls(url, Path(url[len("sqlite:///"):]), optuna.storages.RDBStorage(url))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with file_lock(lock_file(self.path, name)):
            yield

    def is_retryable(self, error: BaseException) -> bool:
        """A database another process holds locked for longer than SQLite's own wait."""
        from sqlalchemy.exc import OperationalError

        return isinstance(error, OperationalError) and "database is locked" in str(error)
