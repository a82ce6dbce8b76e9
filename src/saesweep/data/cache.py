"""On-disk activation cache: the LM runs once per key; every trial, process and host shares the result.

Layout under the root (``cfg.cache_dir``, else ``$SAESWEEP_CACHE``, else ``~/.cache/saesweep``)::

    activations/<key>/manifest.json     written last: an entry exists when its manifest does
    activations/<key>/train-00000.npy   float32 [tokens, d] shards of whole token rows (~64 MiB)
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
are prefix-stable (see :mod:`.hf`), so a prefix of a larger entry equals a smaller entry.

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
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from saesweep.config.experiment import ConfigError, HFSource
from saesweep.io import atomic_write_json, file_lock
from saesweep.progress import is_terminal, rich_progress

FORMAT = 1
SHARD_BYTES = 64 * 2**20
NORM_TOKENS = 2**20  # the normalisation statistics use at most this many leading training tokens
_SMALL_FILE = 2**20  # files up to this size are fingerprinted by content, larger ones by size + mtime
STALE_S = 3600.0  # a temp folder of another host untouched this long belongs to a dead build
OLD_GRACE_S = 3600.0  # a replaced entry is kept this long for the processes still reading it
WAIT_S = 7200.0  # cache_mode wait: how long to wait for an entry (env SAESWEEP_CACHE_WAIT_S)
WAIT_POLL_S = 5.0  # and how often to look (env SAESWEEP_CACHE_WAIT_POLL_S)
MODES = ("build", "wait")


# ----------------------------------------------------------------------------- keys
def cache_root(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """``cache_dir``, else ``$SAESWEEP_CACHE``, else ``~/.cache/saesweep``."""
    root = cache_dir or os.environ.get("SAESWEEP_CACHE") or Path.home() / ".cache" / "saesweep"
    return Path(root).expanduser()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


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
            sig = _sha256_file(f) if st.st_size <= _SMALL_FILE else f"{st.st_size}:{st.st_mtime_ns}"
            items.append([name, sig])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def key_fields(source: HFSource) -> dict[str, Any]:
    """What the activations depend on; local model and data folders by fingerprint, not path."""
    from saesweep.data.lm import dataset_files, is_local_dataset, is_local_model

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
        "layer": source.layer,
        "dataset": dataset,
        "split": source.split,
        "eval_split": source.eval_split,
        "text_column": source.text_column,
        "context_length": source.context_length,
        "prepend_bos": source.prepend_bos,
        "lm_dtype": source.lm_dtype,
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


def _stats(arrays: Sequence[np.ndarray], n: int) -> tuple[float, list[float]]:
    """``(scale, mean)`` over the first ``n`` rows of the concatenated ``arrays``.

    The scale gives E||scale x||^2 = d (the manifest's convention; :meth:`CacheEntry.stats`
    converts it to the trainer's unit norm), accumulated in float64 chunks.
    """
    d = arrays[0].shape[1]
    sq, total, seen = 0.0, np.zeros(d, np.float64), 0
    for a in arrays:
        for i in range(0, a.shape[0], 65536):
            if seen >= n:
                break
            chunk = np.asarray(a[i : min(a.shape[0], i + 65536, i + n - seen)], dtype=np.float64)
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
        scale, mean = _stats(self._shards, min(n, NORM_TOKENS, self.train_tokens))
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
                out[order[a:b]] = self._shards[s][sidx[a:b] - self._starts[s]]
        return out

    def heldout_activations(self, n: int) -> np.ndarray:
        return np.array(self._heldout[:n], dtype=np.float32)

    def heldout_token_ids(self, rows: int) -> np.ndarray:
        return np.array(self._heldout_ids[:rows], dtype=np.int64)

    def close(self) -> None:
        self._shards, self._heldout, self._heldout_ids = [], None, None


def _try_open(path: Path, train_rows: int, heldout_rows: int) -> Optional[CacheEntry]:
    manifest = read_manifest(path)
    if manifest is None or manifest["train"]["rows"] < train_rows or manifest["heldout"]["rows"] < heldout_rows:
        return None
    try:
        return CacheEntry(path, manifest)
    except (OSError, ValueError):  # replaced under our feet: take the lock and look again
        return None


# ----------------------------------------------------------------------------- building
class _Writer:
    """Writes a stream of ``[n, d]`` float32 blocks into .npy files of given token counts."""

    def __init__(self, folder: Path, names: Iterator[str], sizes: Sequence[int]) -> None:
        self.folder, self.names, self.sizes = folder, names, list(sizes)
        self.done: list[dict] = []
        self._mm: Optional[np.memmap] = None
        self._pos = 0

    def write(self, a: np.ndarray) -> None:
        while a.shape[0]:
            if self._mm is None:
                if len(self.done) == len(self.sizes):
                    raise RuntimeError("more activations than planned")
                self._name = next(self.names)
                shape = (self.sizes[len(self.done)], a.shape[1])
                self._mm = np.lib.format.open_memmap(self.folder / self._name, mode="w+", dtype=np.float32, shape=shape)
                self._pos = 0
            take = min(a.shape[0], self._mm.shape[0] - self._pos)
            self._mm[self._pos : self._pos + take] = a[:take]
            self._pos += take
            a = a[take:]
            if self._pos == self._mm.shape[0]:
                self._close()

    def _close(self) -> None:
        assert self._mm is not None
        self._mm.flush()
        tokens = self._mm.shape[0]
        self._mm = None
        path = self.folder / self._name
        size, sha = path.stat().st_size, _sha256_file(path)
        self.done.append({"file": self._name, "tokens": tokens, "bytes": size, "sha256": sha})

    def finish(self) -> list[dict]:
        if self._mm is not None or len(self.done) != len(self.sizes):
            raise RuntimeError("fewer activations than planned")
        return self.done


@contextlib.contextmanager
def _progress(enabled: Optional[bool], total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (only when stderr is a terminal, unless forced)."""
    if enabled is None:
        enabled = is_terminal()
    if not enabled:
        yield lambda n: None
        return
    with rich_progress("rows") as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("saesweep")
    except Exception:
        return "unknown"


def _build(
    source: HFSource,
    root: Path,
    key: str,
    train_rows: int,
    heldout_rows: int,
    old: Optional[dict],
    *,
    device: Any,
    progress: Optional[bool],
    shard_bytes: int,
) -> tuple[dict, bool]:
    """Compute an entry in a temp folder and rename it into place; ``(manifest, ours)`` (see _publish)."""
    from saesweep.data.lm import ActivationProducer, tokens_per_row

    adir = root / "activations"
    final = adir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{_host()}-{os.getpid()}-", dir=adir))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    t0 = time.time()
    try:
        producer = ActivationProducer(source, train_rows, heldout_rows, device=device, datasets_cache=root / "datasets")
        per = tokens_per_row(source)
        np.save(tmp / "heldout_ids.npy", producer.rows.heldout)
        ids_info = {"file": "heldout_ids.npy", "rows": heldout_rows, "bytes": (tmp / "heldout_ids.npy").stat().st_size,
                    "sha256": _sha256_file(tmp / "heldout_ids.npy")}
        with _progress(progress, heldout_rows + train_rows, f"activations {source.hook}") as advance:
            held = _Writer(tmp, iter(["heldout.npy"]), [heldout_rows * per])
            for a in producer.activations(producer.rows.heldout):
                held.write(a)
                advance(a.shape[0] // per)
            (held_info,) = held.finish()
            d = int(np.load(tmp / "heldout.npy", mmap_mode="r").shape[1])

            shard_rows = max(1, shard_bytes // (per * d * 4))
            reused: list[dict] = []
            if old and old["d_in"] == d and old["train"]["shard_rows"] == shard_rows:
                full = [s for s in old["train"]["shards"] if s["tokens"] == shard_rows * per]
                for s in full[: train_rows // shard_rows]:
                    with contextlib.suppress(OSError):
                        os.link(final / s["file"], tmp / s["file"])
                    if not (tmp / s["file"]).exists():
                        shutil.copyfile(final / s["file"], tmp / s["file"])
                    reused.append(s)
            skip = len(reused) * shard_rows
            advance(skip)
            n_shards = -(-train_rows // shard_rows)
            sizes = [min(shard_rows, train_rows - i * shard_rows) * per for i in range(len(reused), n_shards)]
            train = _Writer(tmp, (f"train-{i:05d}.npy" for i in itertools.count(len(reused))), sizes)
            for a in producer.activations(_advancing(itertools.islice(producer.rows.train, skip, None), advance)):
                train.write(a)
            shards = reused + train.finish()
        arrays = [np.load(tmp / s["file"], mmap_mode="r") for s in shards]
        n_stats = min(train_rows * per, NORM_TOKENS)
        scale, mean = _stats(arrays, n_stats)
        del arrays
        manifest = {
            "format": FORMAT,
            "key": key,
            "key_fields": key_fields(source),
            "source": source.model_dump(mode="json", exclude={"lm_batch_size"}),
            "d_in": d,
            "dtype": "float32",
            "context_length": source.context_length,
            "tokens_per_row": per,
            "train": {"rows": train_rows, "tokens": train_rows * per, "shard_rows": shard_rows, "shards": shards},
            "heldout": {"rows": heldout_rows, "tokens": heldout_rows * per, "from": producer.rows.heldout_from,
                        "activations": held_info, "token_ids": ids_info},
            "stats": {"tokens": n_stats, "scale": scale, "mean": mean},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 3),
            "reused_shards": len(reused),
            "saesweep_version": _version(),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        return _publish(tmp, adir, key, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, adir: Path, key: str, manifest: dict) -> tuple[dict, bool]:
    """Rename the built folder into place; ``(manifest in place, whether it is ours)``.

    With the key's lock held nobody else publishes. Without it (a shared filesystem whose
    locks do not reach other hosts) another host may have published meanwhile: an entry at
    least as large as ours is kept and ours discarded; a smaller one is moved aside (kept for
    its readers, see OLD_GRACE_S) and ours put in its place.
    """
    final = adir / key
    rows, held = manifest["train"]["rows"], manifest["heldout"]["rows"]
    for _ in range(10):
        there = read_manifest(final)
        if there is not None and there["train"]["rows"] >= rows and there["heldout"]["rows"] >= held:
            shutil.rmtree(tmp, ignore_errors=True)
            return there, False
        if final.exists():
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, adir / f".old-{key}-{int(time.time())}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(tmp, final)
            return manifest, True
        except OSError:  # ENOTEMPTY / EEXIST: another host's entry landed between the two renames
            time.sleep(0.05)
    raise RuntimeError(f"activation cache {adir}: could not publish entry {key} (other hosts keep replacing it)")


def _advancing(rows: Iterable[np.ndarray], advance: Callable[[int], None]) -> Iterator[np.ndarray]:
    for r in rows:
        yield r
        advance(1)


def _host() -> str:
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


def _builder(tmp_name: str) -> Optional[tuple[str, int]]:
    """(host, pid) of the build that owns a ``.tmp-<key>-<host>-<pid>-*`` folder."""
    parts = tmp_name.split("-")
    if len(parts) >= 5 and parts[3].isdigit():
        return parts[2], int(parts[3])
    return None


def _tmp_is_dead(path: Path) -> bool:
    """A temp folder whose build cannot be running: this host's with its process gone, or
    (whoever's) untouched for STALE_S."""
    owner = _builder(path.name)
    if owner is not None and owner[0] == _host() and not _pid_alive(owner[1]):
        return True
    return time.time() - _newest_mtime(path) > STALE_S


def _clear_stale(adir: Path, key: str) -> None:
    """Remove what killed builds of ``key`` left, and replaced entries past their grace period
    (call with the key's lock held; safe without it too: a live build is never removed)."""
    for p in adir.glob(f".tmp-{key}-*"):
        if _tmp_is_dead(p):
            shutil.rmtree(p, ignore_errors=True)
    for p in adir.glob(f".old-{key}-*"):
        parts = p.name.split("-")
        stamp = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else 0
        if time.time() - stamp > OLD_GRACE_S:
            shutil.rmtree(p, ignore_errors=True)


def _builds_in_progress(adir: Path, key: str) -> list[str]:
    out = []
    for p in adir.glob(f".tmp-{key}-*"):
        owner = _builder(p.name)
        if not _tmp_is_dead(p):
            out.append(f"{owner[0]} (pid {owner[1]})" if owner else p.name)
    return out


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"${name}: expected a number of seconds, got {os.environ.get(name)!r}") from None


def wait_for_entry(source: HFSource, root: Path, train_rows: int, heldout_rows: int, *,
                   timeout_s: Optional[float] = None, poll_s: Optional[float] = None,
                   echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> CacheEntry:
    """``cache_mode: wait``: the entry once some other process has built it; never builds.

    Raises :class:`ConfigError` after ``timeout_s`` (default ``$SAESWEEP_CACHE_WAIT_S`` or
    WAIT_S) with what is there and how to fill the cache.
    """
    key = entry_key(source)
    adir = Path(root) / "activations"
    timeout_s = _env_float("SAESWEEP_CACHE_WAIT_S", WAIT_S) if timeout_s is None else timeout_s
    poll_s = _env_float("SAESWEEP_CACHE_WAIT_POLL_S", WAIT_POLL_S) if poll_s is None else poll_s
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        entry = _try_open(adir / key, train_rows, heldout_rows)
        if entry is not None:
            return entry
        if time.monotonic() >= deadline:
            break
        if not told:
            builders = _builds_in_progress(adir, key) if adir.is_dir() else []
            echo(f"cache_mode wait: waiting up to {timeout_s:g}s for activation cache entry {key} in {adir}"
                 + (f" (being built by {', '.join(builders)})" if builders else ""))
            told = True
        time.sleep(max(0.01, min(poll_s, deadline - time.monotonic())))
    there = read_manifest(adir / key)
    if there is not None:
        have = f"it holds {there['train']['rows']} training and {there['heldout']['rows']} held-out rows; " \
               f"{train_rows} and {heldout_rows} are needed"
    else:
        builders = _builds_in_progress(adir, key) if adir.is_dir() else []
        have = f"a build is in progress on {', '.join(builders)}" if builders else "nobody is building it"
    raise ConfigError(
        f"cache_mode wait: activation cache entry {key} ({source.model} {source.hook} on {source.dataset}) not ready in "
        f"{adir} after {timeout_s:g}s: {have}. Fill it on one host with `saesweep cache warm --spec SPEC` "
        f"(or `--config CONFIG`), or set cache_mode: build; $SAESWEEP_CACHE_WAIT_S sets the wait"
    )


def open_entry(
    source: HFSource,
    root: Path,
    train_rows: int,
    heldout_rows: int,
    *,
    device: Any = "cpu",
    progress: Optional[bool] = None,
    shard_bytes: Optional[int] = None,
    mode: str = "build",
) -> CacheEntry:
    """The entry for ``source`` with at least the given training and held-out token rows.

    Reads an existing entry without locking. Otherwise, with ``mode="build"``, takes the key's
    lock, looks again, and builds (growing an existing smaller entry to the larger of both
    requests); with ``mode="wait"``, waits for another process to build it (:func:`wait_for_entry`).
    """
    if mode not in MODES:
        raise ConfigError(f"cache_mode: {mode!r} is not one of {', '.join(MODES)}")
    key = entry_key(source)
    adir = Path(root) / "activations"
    adir.mkdir(parents=True, exist_ok=True)
    entry = _try_open(adir / key, train_rows, heldout_rows)
    if entry is not None:
        return entry
    if mode == "wait":
        return wait_for_entry(source, root, train_rows, heldout_rows)
    lock = adir / f"{key}.lock"
    try:
        held = file_lock(lock, timeout=0)
        held.__enter__()
    except TimeoutError:
        builders = _builds_in_progress(adir, key)
        if progress is not False:
            print(f"activation cache: waiting for {', '.join(builders) or 'another process'} to build entry {key}",
                  file=sys.stderr, flush=True)
        held = file_lock(lock)
        held.__enter__()
    try:
        entry = _try_open(adir / key, train_rows, heldout_rows)
        if entry is not None:
            return entry
        _clear_stale(adir, key)
        old = read_manifest(adir / key)
        if old is not None:
            train_rows = max(train_rows, old["train"]["rows"])
            heldout_rows = max(heldout_rows, old["heldout"]["rows"])
        manifest, ours = _build(source, Path(root), key, train_rows, heldout_rows, old,
                                device=device, progress=progress, shard_bytes=shard_bytes or SHARD_BYTES)
        return CacheEntry(adir / key, manifest, built=ours)
    finally:
        held.__exit__(None, None, None)


def warm(configs: Sequence[Any], *, device: Any = "cpu", progress: Optional[bool] = None) -> list[dict]:
    """Build (or find) every entry the configs' hf sources need, each with the largest request
    among them, so that hosts with ``cache_mode: wait`` only read. Returns one dict per entry."""
    from saesweep.data.lm import check_source, needed_rows

    groups: dict[tuple[str, str], list] = {}
    for cfg in configs:
        if getattr(cfg.source, "kind", None) != "hf":
            continue
        check_source(cfg.source)
        train_rows, heldout_rows = needed_rows(cfg)
        root = cache_root(cfg.cache_dir)
        g = groups.setdefault((str(root), entry_key(cfg.source)), [cfg.source, 0, 0])
        g[1], g[2] = max(g[1], train_rows), max(g[2], heldout_rows)
    out = []
    for (root, key), (source, train_rows, heldout_rows) in groups.items():
        t0 = time.perf_counter()
        entry = open_entry(source, Path(root), train_rows, heldout_rows, device=device, progress=progress)
        out.append({"key": key, "root": root, "built": entry.built, "tokens": entry.train_tokens,
                    "model": source.model, "hook": source.hook, "dataset": source.dataset,
                    "seconds": round(time.perf_counter() - t0, 1), "path": str(entry.path)})
        entry.close()
    return out


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
                if p.name.startswith(".tmp-") and _builder(p.name) is not None and not _tmp_is_dead(p):
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
    return all(_sha256_file(path / f["file"]) == f["sha256"] for f in _files(manifest))
