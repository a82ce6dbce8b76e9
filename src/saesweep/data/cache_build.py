"""Building cache entries once per key across processes and hosts, and waiting for another host's
build: the LM runs into a temp folder beside the entry, the manifest is written last and the
folder renamed into place, under a lock where flock works and safely without one (the layout and
the sharing modes: saesweep.data.cache)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from saesweep.config.experiment import ConfigError, HFSource
from saesweep.data.cache import (
    FORMAT,
    MODES,
    NORM_TOKENS,
    CacheEntry,
    builder_of,
    cache_root,
    entry_key,
    host_name,
    key_fields,
    norm_stats,
    read_manifest,
    sha256_file,
    tmp_is_dead,
    try_open,
)
from saesweep.data.lm import (
    ActivationProducer,
    check_source,
    needed_rows,
    tokens_per_row,
)
from saesweep.io import atomic_write_json, file_lock
from saesweep.progress import is_terminal, rich_progress

OLD_GRACE_S = 3600.0  # a replaced entry is kept this long for the processes still reading it

#: size of a training shard file (whole token rows)
SHARD_BYTES = 64 * 2**20


WAIT_S = 7200.0  # cache_mode wait: how long to wait for an entry (env SAESWEEP_CACHE_WAIT_S)


WAIT_POLL_S = 5.0  # and how often to look (env SAESWEEP_CACHE_WAIT_POLL_S)


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
        size, sha = path.stat().st_size, sha256_file(path)
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
    adir = root / "activations"
    final = adir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{host_name()}-{os.getpid()}-", dir=adir))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    t0 = time.time()
    try:
        producer = ActivationProducer(source, train_rows, heldout_rows, device=device, datasets_cache=root / "datasets")
        per = tokens_per_row(source)
        np.save(tmp / "heldout_ids.npy", producer.rows.heldout)
        ids_info = {"file": "heldout_ids.npy", "rows": heldout_rows, "bytes": (tmp / "heldout_ids.npy").stat().st_size,
                    "sha256": sha256_file(tmp / "heldout_ids.npy")}
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
        scale, mean = norm_stats(arrays, n_stats)
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


def _clear_stale(adir: Path, key: str) -> None:
    """Remove what killed builds of ``key`` left, and replaced entries past their grace period
    (call with the key's lock held; safe without it too: a live build is never removed)."""
    for p in adir.glob(f".tmp-{key}-*"):
        if tmp_is_dead(p):
            shutil.rmtree(p, ignore_errors=True)
    for p in adir.glob(f".old-{key}-*"):
        parts = p.name.split("-")
        stamp = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else 0
        if time.time() - stamp > OLD_GRACE_S:
            shutil.rmtree(p, ignore_errors=True)


def _builds_in_progress(adir: Path, key: str) -> list[str]:
    out = []
    for p in adir.glob(f".tmp-{key}-*"):
        owner = builder_of(p.name)
        if not tmp_is_dead(p):
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
        entry = try_open(adir / key, train_rows, heldout_rows)
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
    entry = try_open(adir / key, train_rows, heldout_rows)
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
        entry = try_open(adir / key, train_rows, heldout_rows)
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
