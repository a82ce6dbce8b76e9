"""Where a sweep lives: one backend per kind, each in its own module, behind the contract in
:mod:`.base`. :func:`open_backend` picks the backend whose ``accepts`` takes the URL."""

from __future__ import annotations

from typing import Optional

from saesweep.errors import ConfigError
from saesweep.sweep.storages.base import Backend
from saesweep.sweep.storages.journal import JournalBackend
from saesweep.sweep.storages.memory import MemoryBackend
from saesweep.sweep.storages.postgresql import PostgresBackend
from saesweep.sweep.storages.sqlite import SQLiteBackend
from saesweep.sweep.urls import redact

#: every backend, in the order URLs are matched (a plain path, the journal, last)
BACKENDS: tuple[type[Backend], ...] = (PostgresBackend, SQLiteBackend, MemoryBackend, JournalBackend)

__all__ = ["BACKENDS", "Backend", "backend_for", "open_backend", "secret_to_env", "split_secret"]


def backend_for(url: str) -> type[Backend]:
    """The backend class for ``url``; a ConfigError naming the schemes for anything else."""
    for cls in BACKENDS:
        if cls.accepts(url):
            return cls
    raise ConfigError(f"--storage {redact(url)}: unknown scheme; use a journal file path, postgresql://... or sqlite:///...")


def open_backend(url: str, *, create: bool = True, read_only: bool = False) -> Backend:
    """The opened storage ``url`` names (see :meth:`Backend.open`)."""
    return backend_for(url).open(url, create=create, read_only=read_only)


def split_secret(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its secret and the environment that carries it, as its backend says
    (:meth:`Backend.split_secret`)."""
    return backend_for(url).split_secret(url)


def secret_to_env(url: str, env: Optional[dict] = None) -> str:
    """The URL without its secret, which goes into ``env`` (default: this process's environment)."""
    import os

    bare, secrets = split_secret(url)
    (os.environ if env is None else env).update(secrets)
    return bare
