"""``:memory:`` -- Optuna's in-memory storage: one process, gone when it ends (tests, trials in a
notebook)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import optuna

from saesweep.sweep.storages.base import Backend


class MemoryBackend(Backend):
    kind, title = "memory", "an in-memory storage"
    concurrent_workers = False

    @classmethod
    def accepts(cls, url: str) -> bool:
        return url == ":memory:"

    @classmethod
    def open(cls, url: str, *, create: bool = True, read_only: bool = False) -> "MemoryBackend":
        return cls(url, None, optuna.storages.InMemoryStorage())

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        yield  # one process: nothing to exclude
