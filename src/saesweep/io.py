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

from saesweep.errors import ConfigError, CorruptFile


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


#: the safetensors metadata key holding the digest of a file's tensors (:func:`tensors_digest`)
CHECKSUM_KEY = "saesweep.sha256"


def tensors_digest(tensors: Mapping) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors file written atomically (never pickles), the digest of its tensors in its metadata."""
    from safetensors.torch import save

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(cpu, metadata={**dict(metadata or {}), CHECKSUM_KEY: tensors_digest(cpu)})
    return atomic_write_bytes(path, data)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """A safetensors file's tensors and metadata, checked against the digest it carries (files
    written without one are taken as they are); :class:`CorruptFile` when they do not match."""
    from safetensors import safe_open

    with safe_open(str(path), "pt", device="cpu") as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    want = metadata.get(CHECKSUM_KEY)
    if want is not None and tensors_digest(tensors) != want:
        raise CorruptFile(f"{path}: its tensors do not match the checksum written with them (the file is damaged)")
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def verify_tensors(path: str | os.PathLike) -> Optional[str]:
    """None when a safetensors file reads back whole and matches its checksum, else what is wrong."""
    try:
        load_tensors(path)
    except CorruptFile:
        return "checksum mismatch: the tensors are damaged"
    except Exception as e:  # not safetensors at all, a torn header, a truncated file
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    return None


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


def check_creatable(path: str | os.PathLike, what: str) -> None:
    """Raise a ConfigError naming ``what`` unless the folder ``path`` exists writable or could be
    created (its nearest existing parent is a writable folder); creates nothing."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path}: {'exists and is not a folder' if probe == p else f'{probe} is not a folder'}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {'not writable' if probe == p else f'cannot create it under {probe}'}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()
