"""Atomic file writes and inter-process locks.

Everything that matters (checkpoints, results, manifests) is written to a temporary file in
the target's folder and renamed over it, so a reader sees the old file or the new one, never
half of one, and a crash leaves no torn file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from saesweep.config.experiment import ConfigError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors file written atomically (never pickles)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    return atomic_write_bytes(path, data)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, timeout: float | None = None, poll: float = 0.2) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing, kept: a waiter may hold it open);
    released when the block ends or the process dies. A ``TimeoutError`` after ``timeout`` s."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=-1 if timeout is None else timeout, mode=0o644, poll_interval=poll,
                    preserve_lock_file=True, fallback_to_soft=False)
    with lock:  # filelock.Timeout is a TimeoutError
        yield


class HeldLock:
    """An exclusive ``flock`` on ``path`` held until :meth:`release` or the process's end (the
    kernel drops it even on ``kill -9``): a liveness signal that costs no writes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.fd: Optional[int] = None
        for attempt in range(10):  # another holder may remove the (then empty) folder meanwhile
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                break
            except FileNotFoundError:
                if attempt == 9:
                    raise
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        """Let go, and remove the file (and its folder when that is left empty)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def is_held(path: str | os.PathLike) -> bool:
    """Whether some process (this one included) holds an exclusive flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def ensure_folder(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` (and its parents) or raise a ConfigError naming ``what``
    (a field or flag) and why: under a file, on a read-only or pseudo filesystem, no permission."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {path}: exists and is not a folder") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot create it ({e.strerror})") from None
    if not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {path}: not writable")
    return p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()
