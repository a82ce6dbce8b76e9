"""``sqlite:///PATH`` -- Optuna's RDB storage on SQLite, for a single worker: SQLite does not
give the row locks that concurrent claiming needs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import optuna

from saesweep.errors import ConfigError
from saesweep.io import file_lock
from saesweep.sweep.storages.base import Backend, lock_file


class SQLiteBackend(Backend):
    kind, title = "sqlite", "SQLite"
    concurrent_workers = False

    @classmethod
    def accepts(cls, url: str) -> bool:
        return url.startswith("sqlite:///")

    @classmethod
    def check(cls, url: str) -> None:
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise ConfigError(f"--storage {url}: no folder {path.parent} for the database file; create it first")

    @classmethod
    def open(cls, url: str, *, create: bool = True, read_only: bool = False) -> "SQLiteBackend":
        path = Path(url[len("sqlite:///"):])
        cls.check(url)
        if not create and not path.is_file():
            raise ConfigError(f"--storage {url}: no such database file")
        try:
            storage = optuna.storages.RDBStorage(url)
        except Exception as e:  # a file that is not a database, no write permission, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError(f"--storage {url}: cannot open it as an SQLite database ({first})") from None
        return cls(url, path, storage)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with file_lock(lock_file(self.path, name)):
            yield

    def is_retryable(self, error: BaseException) -> bool:
        """A database another process holds locked for longer than SQLite's own wait."""
        from sqlalchemy.exc import OperationalError

        return isinstance(error, OperationalError) and "database is locked" in str(error)
