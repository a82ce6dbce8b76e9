"""A file path or ``journal:PATH`` -- Optuna's append-only journal file: the embedded default,
safe for many processes on one host, or on a shared filesystem with working locks. A worker
proves it is alive by holding a lock file beside it (:attr:`Backend.liveness_locks`), so the
journal grows with the trials, not with training time.

The file is read and written through :class:`SafeJournalFile`, which never leaves a torn line:
a partial final line (a writer killed mid-write, a full disk) is dropped with a warning before
the next record is appended, an append that fails (``ENOSPC``) is cut back to where it began,
and a line that is not a record (garbage appended by something else) is skipped with a warning.
A damaged tail costs at most its last record. A record torn in the middle of the file (which this
writer never leaves) or a file that does not start with a record is refused by name, with how to
recover."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from saesweep.errors import ConfigError
from saesweep.io import ensure_folder, file_lock
from saesweep.sweep.storages.base import Backend, lock_file
from saesweep.sweep.urls import redact


class JournalBackend(Backend):
    kind, title = "journal", "a journal file"
    liveness_locks = True

    @classmethod
    def accepts(cls, url: str) -> bool:
        return url.startswith("journal:") or "://" not in url

    @classmethod
    def open(cls, url: str, *, create: bool = True, read_only: bool = False) -> "JournalBackend":
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
        from optuna.storages.journal import JournalFileOpenLock, JournalStorage

        if path.exists() and not _starts_with_a_record(path):
            raise ConfigError(journal_damage(path, ValueError("not a sweep journal")))
        try:
            backend = safe_journal_file()(str(path), lock_obj=JournalFileOpenLock(str(path)))
            if not read_only:  # a reader skips a torn tail by itself
                backend.repair()
            storage = JournalStorage(backend)
        except (UnicodeDecodeError, ValueError) as e:  # a damaged line (json.JSONDecodeError is a ValueError)
            raise ConfigError(journal_damage(path, e)) from None
        return cls(url, path, storage)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with file_lock(lock_file(self.path, name)):
            yield


def journal_record(line: bytes) -> Optional[dict[str, Any]]:
    """The journal record a line holds, or None when it holds none (not JSON, or JSON that is not
    one of Optuna's operations)."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and "op_code" in record else None


def _starts_with_a_record(path: Path) -> bool:
    """Whether the file is empty or its first line is a journal record (else it is not a journal)."""
    with open(path, "rb") as fh:
        first = fh.readline()
    if not first or not first.endswith(b"\n"):
        return True  # empty, or one torn record: dropped when written next
    return journal_record(first) is not None


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



@functools.lru_cache(maxsize=1)
def safe_journal_file() -> type:
    """:class:`SafeJournalFile` (built on first use: importing Optuna's journal is not free)."""
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file
    from optuna.storages.journal._storage import JournalOperation

    #: what a line that is not a record stands for, so that the count of lines read stays right: an
    #: attribute of a study that does not exist, from no worker (Optuna ignores it)
    skip = {"op_code": JournalOperation.SET_STUDY_USER_ATTR, "study_id": -1, "worker_id": "saesweep-skipped-line",
            "user_attr": {}}

    class SafeJournalFile(JournalFileBackend):
        """Optuna's journal file that never leaves, nor chokes on, a torn line (see the module)."""

        def _drop_torn_tail(self, fd: int) -> int:
            """Cut a partial final line off the open file; returns the file's size after."""
            end = os.lseek(fd, 0, os.SEEK_END)
            if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
                return end
            pos = end
            while pos > 0:
                start = max(0, pos - 65536)
                nl = os.pread(fd, pos - start, start).rfind(b"\n")
                if nl >= 0:
                    pos = start + nl + 1
                    break
                pos = start
            warnings.warn(f"sweep journal {self._file_path}: dropped a partial final record of {end - pos} bytes "
                          "(a write was cut off); everything before it is kept", stacklevel=3)
            os.ftruncate(fd, pos)
            return pos

        def repair(self) -> None:
            """Drop a partial final line, under the journal's lock."""
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_RDWR)
                try:
                    self._drop_torn_tail(fd)
                finally:
                    os.close(fd)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_RDWR)
                try:
                    end = self._drop_torn_tail(fd)
                    try:
                        view, at = memoryview(data), end
                        while view:
                            n = os.pwrite(fd, view, at)
                            view, at = view[n:], at + n
                        os.fsync(fd)
                    except OSError:
                        os.ftruncate(fd, end)  # no torn line left behind (a full disk)
                        raise
                finally:
                    os.close(fd)

        def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
            """Optuna's reader, except that a complete line that is not a record is skipped with a
            warning (it still counts as read), and a partial final line is left for the writer."""
            with open(self._file_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                number = 0
                if log_number_from in self._log_number_offset:
                    f.seek(self._log_number_offset[log_number_from])
                    number = log_number_from
                    size -= self._log_number_offset[log_number_from]
                for line in f:
                    size -= len(line)
                    if size < 0 or not line.endswith(b"\n"):
                        break  # being written, or torn: not a record yet
                    self._log_number_offset.setdefault(number + 1, self._log_number_offset[number] + len(line))
                    if number >= log_number_from:
                        log = journal_record(line)
                        if log is None:
                            if line.startswith(b'{"op_code"'):  # a record torn in the middle of the journal:
                                # skipping it could misnumber the trials after it
                                raise ValueError(f"Invalid log format: line {number + 1}")
                            warnings.warn(f"sweep journal {self._file_path}: line {number + 1} is not a record; "
                                          "skipped", stacklevel=2)
                            log = dict(skip)
                        yield log
                    number += 1

    return SafeJournalFile
