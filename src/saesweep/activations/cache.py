"""On-disk activation cache: the LM runs once per key; every trial and process shares the result.

Layout under the root (``cfg.cache_dir``, else ``$SAESWEEP_CACHE``, else ``~/.cache/saesweep``)::

    activations/<key>/manifest.json     written last: an entry exists when its manifest does
    activations/<key>/train-00000.npy   float32 [tokens, d] shards of whole token rows (~64 MiB)
    activations/<key>/heldout.npy       float32 [tokens, d] held-out activations
    activations/<key>/heldout_ids.npy   int64 [rows, context_length] held-out token ids
    activations/<key>.lock              flock held by the one process that builds the entry
    activations/.tmp-<key>-*            a build in progress, or killed: never read
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

from ..config import ConfigError, HFSource
from ..io import atomic_write_json, file_lock

FORMAT = 1
SHARD_BYTES = 64 * 2**20
NORM_TOKENS = 2**20  # the normalisation statistics use at most this many leading training tokens
_SMALL_FILE = 2**20  # files up to this size are fingerprinted by content, larger ones by size + mtime


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
    from .hf import dataset_files, is_local_dataset, is_local_model

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

    The scale is :func:`.base.norm_scale`'s (E||scale x||^2 = d), accumulated in float64 chunks.
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
        """``(scale, raw mean)`` over the first min(n, NORM_TOKENS) training activations."""
        st = self.manifest["stats"]
        if min(n, NORM_TOKENS) == st["tokens"]:
            return st["scale"], st["mean"]
        return _stats(self._shards, min(n, NORM_TOKENS, self.train_tokens))

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

    def train_activations(self, start: int, stop: int) -> np.ndarray:
        """Training activations ``[stop - start, d]`` in cache order."""
        return self.gather(np.arange(start, stop))

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
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
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
) -> dict:
    """Compute an entry in a temp folder and rename it into place; returns its manifest."""
    from .hf import ActivationProducer, tokens_per_row

    adir = root / "activations"
    final = adir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=adir))
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
        trash = None
        if final.exists():
            trash = adir / f".old-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        os.rename(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _advancing(rows: Iterable[np.ndarray], advance: Callable[[int], None]) -> Iterator[np.ndarray]:
    for r in rows:
        yield r
        advance(1)


def _clear_stale(adir: Path, key: str) -> None:
    """Remove temp folders of ``key`` left by killed builds (call with the key's lock held)."""
    for p in itertools.chain(adir.glob(f".tmp-{key}-*"), adir.glob(f".old-{key}-*")):
        shutil.rmtree(p, ignore_errors=True)


def open_entry(
    source: HFSource,
    root: Path,
    train_rows: int,
    heldout_rows: int,
    *,
    device: Any = "cpu",
    progress: Optional[bool] = None,
    shard_bytes: Optional[int] = None,
) -> CacheEntry:
    """The entry for ``source`` with at least the given training and held-out token rows.

    Reads an existing entry without locking; otherwise takes the key's lock, looks again, and
    builds (growing an existing smaller entry to the larger of both requests).
    """
    key = entry_key(source)
    adir = Path(root) / "activations"
    adir.mkdir(parents=True, exist_ok=True)
    entry = _try_open(adir / key, train_rows, heldout_rows)
    if entry is not None:
        return entry
    with file_lock(adir / f"{key}.lock"):
        entry = _try_open(adir / key, train_rows, heldout_rows)
        if entry is not None:
            return entry
        _clear_stale(adir, key)
        old = read_manifest(adir / key)
        if old is not None:
            train_rows = max(train_rows, old["train"]["rows"])
            heldout_rows = max(heldout_rows, old["heldout"]["rows"])
        manifest = _build(source, Path(root), key, train_rows, heldout_rows, old,
                          device=device, progress=progress, shard_bytes=shard_bytes or SHARD_BYTES)
        return CacheEntry(adir / key, manifest, built=True)


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
