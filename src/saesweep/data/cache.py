"""On-disk activation cache: the LM runs once per key; every trial, process and host shares the
result. This module holds the format (keys, manifests, reading entries, listing and removing
them); :mod:`.cache_build` builds entries.

Layout under the root (``cfg.cache_dir``, else ``$SAESWEEP_CACHE``, else ``~/.cache/saesweep``)::

    activations/<key>/manifest.json     written last: an entry exists when its manifest does
    activations/<key>/train-00000.npy   [tokens, d] shards of whole token rows (~64 MiB), in the
                                        entry's dtype: float32, float16, or bfloat16 (its bits as uint16)
    activations/<key>/heldout.npy       float32 [tokens, d] held-out activations
    activations/<key>/heldout_ids.npy   int64 [rows, context_length] held-out token ids
    activations/<key>.lock              flock held by the one process that builds the entry
    activations/.tmp-<key>-<host>-<pid>-*  a build in progress (or killed): never read
    activations/.old-<key>-<time>-*     an entry replaced by a larger one, kept an hour for its readers
    datasets/                           Arrow copies of local data files (``datasets``' cache)

The key hashes what determines the activations (model identity, hook layer, dataset, splits,
text column, context length, BOS, LM dtype), not the token counts: an entry with at least
the requested rows is reused (callers take a prefix), and a smaller one is rebuilt with the
larger counts, relinking its full training shards instead of recomputing them. Token rows
are prefix-stable (see :mod:`.lm`), so a prefix of a larger entry equals a smaller entry.

An entry is built in a temp folder beside its target, manifest last, then renamed into place,
under ``io.file_lock(activations/<key>.lock)``: concurrent first users wait for the one
builder and then read. Activations are written shard by shard and read through
``np.load(mmap_mode="r")``, so memory stays bounded whatever the token count.

Sharing one cache folder between hosts (a shared filesystem; ``cache_mode`` in the config):

* ``build`` (default): a host that finds no entry builds it. Readers never need a lock: an
  entry appears whole, by one rename of a complete folder. The lock makes one host build
  while the others wait, where ``flock`` works across hosts (local disks, NFSv4 and NFSv3
  with lockd, CephFS, Lustre mounted with ``flock``, GPFS). Where it does not (NFS mounted
  ``nolock`` / ``local_lock=all``, Lustre ``localflock``), correctness still holds, only the
  work is not shared: each host builds its own temp folder (named by host and pid, and never
  removed by another host while its builder may live), the first rename wins and the others
  discard theirs and read the winner's; no entry is replaced by one that is not larger.
* ``wait``: never builds. Polls for a complete entry with the rows it needs (``SAESWEEP_CACHE_WAIT_S``,
  default two hours, then a clear error); for hosts that only read a cache that one host fills
  (``saesweep cache warm``), which needs no lock at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from saesweep.settings import cache_root
from saesweep.errors import ConfigError
from saesweep.config.experiment import HFSource
from saesweep.data.hf import dataset_files, is_local_dataset, is_local_model
from saesweep.io import file_lock, sha256_file

FORMAT = 1
NORM_TOKENS = 2**20  # the normalisation statistics use at most this many leading training tokens
_SMALL_FILE = 2**20  # files up to this size are fingerprinted by content, larger ones by size + mtime
STALE_S = 3600.0  # a temp folder of another host untouched this long belongs to a dead build
MODES = ("build", "wait")

#: how a training shard stores each cache dtype (numpy has no bfloat16: its upper 16 bits as uint16)
STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations ``a`` as stored in a shard of ``dtype`` (bfloat16 rounds to nearest even).
    Raises ValueError when float16 cannot hold them."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = a.astype(np.float16)
        if not np.isfinite(out).all():
            raise ValueError(f"source.cache_dtype: float16 cannot hold these activations (largest |x| = "
                             f"{float(np.abs(a).max()):.4g} > 65504); use bfloat16")
        return out
    u = a.view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored shard rows of ``dtype`` as float32."""
    if dtype == "bfloat16":
        return (np.asarray(a, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


# ----------------------------------------------------------------------------- keys
def _fingerprint(paths: Sequence[Path]) -> str:
    """Content hash of small files, size + mtime of large ones; folders are walked (sorted)."""
    items = []
    for p in paths:
        files = [p] if p.is_file() else sorted(
            f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        for f in files:
            st = f.stat()
            name = f.name if f == p else str(f.relative_to(p))
            sig = sha256_file(f) if st.st_size <= _SMALL_FILE else f"{st.st_size}:{st.st_mtime_ns}"
            items.append([name, sig])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def key_fields(source: HFSource) -> dict[str, Any]:
    """What the activations depend on; local model and data folders by fingerprint, not path.
    A 16-bit ``cache_dtype`` is part of the key (``auto`` must be resolved first, see
    :func:`saesweep.data.budget.plan_activations`); float32 keeps the keys of earlier entries."""
    if is_local_model(source.model):
        model = {"local": _fingerprint([Path(source.model).expanduser()])}
    else:
        model = {"hub": source.model, "revision": source.revision or "main"}
    files = dataset_files(source.dataset)
    if files is not None:
        dataset = {"files": _fingerprint(files)}
    elif is_local_dataset(source.dataset):
        dataset = {"folder": _fingerprint([Path(source.dataset).expanduser()])}
    else:
        dataset = {"hub": source.dataset}
    return {
        "format": FORMAT,
        "model": model,
        # residual hooks by the block whose input they are (resid_post of L = resid_pre of L+1)
        **({"layer": source.site} if isinstance(source.site, int) else {"hook": source.site}),
        "dataset": dataset,
        "split": source.split,
        "eval_split": source.eval_split,
        "text_column": source.text_column,
        "context_length": source.context_length,
        "prepend_bos": source.prepend_bos,
        "lm_dtype": source.lm_dtype,
        **({"cache_dtype": source.cache_dtype} if source.cache_dtype in ("float16", "bfloat16") else {}),
    }


def entry_key(source: HFSource) -> str:
    blob = json.dumps(key_fields(source), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- reading
def _files(manifest: dict) -> list[dict]:
    return [*manifest["train"]["shards"], manifest["heldout"]["activations"], manifest["heldout"]["token_ids"]]


def read_manifest(path: Path) -> Optional[dict]:
    """The manifest of an entry folder when it is complete (every file present, right size)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            return None
        for f in _files(manifest):
            if (path / f["file"]).stat().st_size != f["bytes"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def norm_stats(arrays: Sequence[np.ndarray], n: int, dtype: str = "float32") -> tuple[float, list[float]]:
    """``(scale, mean)`` over the first ``n`` rows of the concatenated ``arrays`` (stored as ``dtype``).

    The scale gives E||scale x||^2 = d (the manifest's convention; :meth:`CacheEntry.stats`
    converts it to the trainer's unit norm), accumulated in float64 chunks.
    """
    d = arrays[0].shape[1]
    sq, total, seen = 0.0, np.zeros(d, np.float64), 0
    for a in arrays:
        for i in range(0, a.shape[0], 65536):
            if seen >= n:
                break
            chunk = decode(a[i : min(a.shape[0], i + 65536, i + n - seen)], dtype).astype(np.float64)
            sq += float(np.einsum("ij,ij->", chunk, chunk))
            total += chunk.sum(0)
            seen += chunk.shape[0]
    mean_sq = sq / max(seen, 1)
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError("activations are all zero or not finite; cannot normalise")
    return math.sqrt(d / mean_sq), (total / seen).tolist()


def _unit(scale_d: float, d: int) -> float:
    """The manifest's scale (E||s x||^2 = d, cache format 1) as the unit-norm scale the
    trainer uses (E||s x||^2 = 1)."""
    return scale_d / math.sqrt(d)


class CacheEntry:
    """A complete cache entry, memory-mapped (``built`` tells whether this process built it)."""

    def __init__(self, path: Path, manifest: dict, built: bool = False) -> None:
        self.path, self.manifest, self.built = Path(path), manifest, built
        self.key: str = manifest["key"]
        self.d_in: int = manifest["d_in"]
        self.dtype: str = manifest.get("dtype", "float32")  # of the training shards
        self._shards = [np.load(self.path / s["file"], mmap_mode="r") for s in manifest["train"]["shards"]]
        self._starts = np.cumsum([0] + [s.shape[0] for s in self._shards])[:-1]
        self._heldout = np.load(self.path / manifest["heldout"]["activations"]["file"], mmap_mode="r")
        self._heldout_ids = np.load(self.path / manifest["heldout"]["token_ids"]["file"], mmap_mode="r")

    @property
    def train_tokens(self) -> int:
        return self.manifest["train"]["tokens"]

    @property
    def heldout_rows(self) -> int:
        return self.manifest["heldout"]["rows"]

    def stats(self, n: int) -> tuple[float, list[float]]:
        """``(scale, raw mean)`` over the first min(n, NORM_TOKENS) training activations, the
        scale giving E||scale x||^2 = 1 (the manifest stores the format's E = d scale)."""
        st = self.manifest["stats"]
        if min(n, NORM_TOKENS) == st["tokens"]:
            return _unit(st["scale"], self.d_in), st["mean"]
        scale, mean = norm_stats(self._shards, min(n, NORM_TOKENS, self.train_tokens), self.dtype)
        return _unit(scale, self.d_in), mean

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Training activations ``[len(idx), d]`` (float32) at token indices ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.train_tokens):
            raise IndexError(f"token index out of range 0..{self.train_tokens - 1}")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        cuts = np.searchsorted(sidx, self._starts[1:], side="left")
        out = np.empty((idx.size, self.d_in), dtype=np.float32)
        for s, (a, b) in enumerate(zip([0, *cuts], [*cuts, idx.size])):
            if a < b:
                out[order[a:b]] = decode(self._shards[s][sidx[a:b] - self._starts[s]], self.dtype)
        return out

    def heldout_activations(self, n: int) -> np.ndarray:
        return np.array(self._heldout[:n], dtype=np.float32)

    def heldout_token_ids(self, rows: int) -> np.ndarray:
        return np.array(self._heldout_ids[:rows], dtype=np.int64)

    def close(self) -> None:
        self._shards, self._heldout, self._heldout_ids = [], None, None


def try_open(path: Path, train_rows: int, heldout_rows: int) -> Optional[CacheEntry]:
    manifest = read_manifest(path)
    if manifest is None or manifest["train"]["rows"] < train_rows or manifest["heldout"]["rows"] < heldout_rows:
        return None
    try:
        return CacheEntry(path, manifest)
    except (OSError, ValueError):  # replaced under our feet: take the lock and look again
        return None


def host_name() -> str:
    """This host's name as used in temp folder names (letters, digits and dots only)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = path.stat().st_mtime
        for f in path.iterdir():
            with contextlib.suppress(OSError):
                newest = max(newest, f.stat().st_mtime)
    return newest


def builder_of(tmp_name: str) -> Optional[tuple[str, int]]:
    """(host, pid) of the build that owns a ``.tmp-<key>-<host>-<pid>-*`` folder."""
    parts = tmp_name.split("-")
    if len(parts) >= 5 and parts[3].isdigit():
        return parts[2], int(parts[3])
    return None


def tmp_is_dead(path: Path) -> bool:
    """A temp folder whose build cannot be running: this host's with its process gone, or
    (whoever's) untouched for STALE_S."""
    owner = builder_of(path.name)
    if owner is not None and owner[0] == host_name() and not _pid_alive(owner[1]):
        return True
    return time.time() - _newest_mtime(path) > STALE_S


# ----------------------------------------------------------------------------- CLI helpers
def _entry_dirs(root: Path) -> list[Path]:
    adir = Path(root) / "activations"
    if not adir.is_dir():
        return []
    return sorted(p for p in adir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_entries(root: Optional[str | os.PathLike] = None) -> list[dict]:
    """One dict per complete entry: key, model, hook, dataset, tokens, eval_tokens, size, created, path."""
    out = []
    for path in _entry_dirs(cache_root(root)):
        m = read_manifest(path)
        if m is None:
            continue
        src = m.get("source", {})
        out.append({
            "key": m["key"],
            "model": src.get("model"),
            "hook": src.get("hook"),
            "dataset": src.get("dataset"),
            "context_length": m["context_length"],
            "d_in": m["d_in"],
            "dtype": m.get("dtype", "float32"),
            "tokens": m["train"]["tokens"],
            "eval_tokens": m["heldout"]["tokens"],
            "size_bytes": _size(path),
            "created": m.get("created"),
            "path": str(path),
        })
    return out


def remove_entries(root: Optional[str | os.PathLike], keys_or_all: Union[str, bool, Iterable[str]]) -> list[str]:
    """Delete entries by key (or unique key prefix), or every entry with ``"all"`` (or True).

    Unknown keys raise :class:`ConfigError` before anything is deleted. Each entry is renamed
    away under its lock before deletion, so no reader sees a half-deleted entry. With
    ``"all"``, temp folders of killed builds are removed too. Returns the removed keys.
    """
    root = cache_root(root)
    adir = root / "activations"
    present = [p.name for p in _entry_dirs(root)]
    everything = keys_or_all is True or keys_or_all == "all"
    if everything:
        keys = present
    else:
        wanted = [keys_or_all] if isinstance(keys_or_all, str) else list(keys_or_all)
        keys = []
        for k in wanted:
            match = [p for p in present if p.startswith(k)] if k else []
            if len(match) != 1:
                why = "matches several entries" if match else "is not in the cache"
                raise ConfigError(f"cache key {k!r} {why} (cache: {adir})")
            keys.append(match[0])
    for key in keys:
        with file_lock(adir / f"{key}.lock"):
            if (adir / key).exists():
                trash = adir / f".old-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(adir / key, trash)
                shutil.rmtree(trash, ignore_errors=True)
    if everything and adir.is_dir():
        for p in adir.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
                key = p.name.split("-")[1]
                if p.name.startswith(".tmp-") and builder_of(p.name) is not None and not tmp_is_dead(p):
                    continue  # a build that may be running (on another host, where the lock may not reach)
                with contextlib.suppress(TimeoutError), file_lock(adir / f"{key}.lock", timeout=0):
                    shutil.rmtree(p, ignore_errors=True)
    return keys


def verify_entry(path: str | os.PathLike) -> bool:
    """True when the entry's manifest is complete and every file matches its sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return False
    return all(sha256_file(path / f["file"]) == f["sha256"] for f in _files(manifest))
