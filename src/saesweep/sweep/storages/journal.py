"""A file path or ``journal:PATH`` -- Optuna's append-only journal file: the embedded default,
safe for many processes on one host, or on a shared filesystem with working locks. A worker
proves it is alive by holding a lock file beside it (:attr:`Backend.liveness_locks`), so the
journal grows with the trials, not with training time."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from saesweep.config.experiment import ConfigError
from saesweep.io import ensure_folder, file_lock
from saesweep.sweep.storages.base import Backend
from saesweep.sweep.urls import redact


class JournalBackend(Backend):
    kind, title = "journal", "a journal file"
    liveness_locks = True

    @classmethod
    def accepts(cls, url: str) -> bool:
        return url.startswith("journal:") or "://" not in url

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> "JournalBackend":
        """With ``create`` false the file must exist already (nothing is created for a sweep
        that is not there)."""
        if url == "":
            raise ConfigError("--storage: empty; give a journal file path, postgresql://... or sqlite:///...")
        path = Path(url[len("journal:"):] if url.startswith("journal:") else url)
        if path.exists() and path.is_dir():
            raise ConfigError(f"--storage {redact(url)}: is a folder; give a journal file path")
        if not create and not path.exists():
            raise ConfigError(f"--storage {redact(url)}: no such sweep journal")
        if create:
            ensure_folder(path.parent, "--storage")
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        try:
            storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        except (UnicodeDecodeError, ValueError) as e:  # a damaged line (json.JSONDecodeError is a ValueError)
            raise ConfigError(journal_damage(path, e)) from None
        return cls(url, path, storage)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with file_lock(str(self.path) + ".saesweep-lock"):
            yield


def journal_damage(path: Path, error: Exception) -> str:
    """A one-line message naming the first line of a journal that does not parse and how to
    recover the sweep from the lines before it."""
    bad, why = None, str(error).splitlines()[0] if str(error) else type(error).__name__
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                bad, why = n, f"{type(e).__name__}: {str(e).splitlines()[0]}"
                break
    where = f"line {bad}" if bad else "a line"
    keep = (f"keep the {bad - 1} intact lines before it (`head -n {bad - 1} {path} > {path}.fixed` and use "
            f"{path}.fixed); trials recorded after that line will run again") if bad and bad > 1 else \
        "nothing before it is readable: restore the file from a backup or start the sweep again"
    return f"--storage {path}: {where} of the sweep journal is damaged ({why}); {keep}"
