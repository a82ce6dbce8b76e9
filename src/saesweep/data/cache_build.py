"""Building cache entries once per key across processes and hosts, and waiting for another host's
build: the LM runs into a temp folder beside the entry, the manifest is written last and the
folder renamed into place, under a lock where flock works and safely without one (the layout and
the sharing modes: saesweep.data.cache)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from saesweep.settings import env
from saesweep.errors import ConfigError
from saesweep.config.experiment import HFSource
from saesweep.data.cache import (
    FORMAT,
    MODES,
    NORM_TOKENS,
    STORAGE,
    CacheEntry,
    builder_of,
    cache_root,
    encode,
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
    tokens_per_row,
)
from saesweep.io import atomic_write_json, file_lock
from saesweep.progress import is_terminal, rich_progress

OLD_GRACE_S = 3600.0  # a replaced entry is kept this long for the processes still reading it

#: size of a training shard file (whole token rows)
SHARD_BYTES = 64 * 2**20



# ----------------------------------------------------------------------------- building
class _Writer:
    """Writes a stream of ``[n, d]`` float32 blocks into .npy files of given token counts, stored
    as ``dtype`` (see :data:`~saesweep.data.cache.STORAGE`).

    Plain file writes, not a memory map: a full disk is an ``OSError`` (ENOSPC) naming the file,
    which the caller turns into a clean stop, where a memory map's fault would kill the process.
    """

    def __init__(self, folder: Path, names: Iterator[str], sizes: Sequence[int], dtype: str = "float32") -> None:
        self.folder, self.names, self.sizes, self.dtype = folder, names, list(sizes), dtype
        self.done: list[dict] = []
        self._fh: Optional[Any] = None
        self._rows = 0
        self._pos = 0

    def write(self, a: np.ndarray) -> None:
        while a.shape[0]:
            if self._fh is None:
                if len(self.done) == len(self.sizes):
                    raise RuntimeError("more activations than planned")
                self._name = next(self.names)
                self._rows, self._pos = self.sizes[len(self.done)], 0
                self._fh = open(self.folder / self._name, "wb")
                header = {"descr": np.lib.format.dtype_to_descr(STORAGE[self.dtype]), "fortran_order": False,
                          "shape": (self._rows, a.shape[1])}
                self._guard(lambda: np.lib.format.write_array_header_1_0(self._fh, header))
            take = min(a.shape[0], self._rows - self._pos)
            block = encode(a[:take], self.dtype)
            self._guard(lambda: self._fh.write(block.tobytes()))
            self._pos += take
            a = a[take:]
            if self._pos == self._rows:
                self._close()

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except OSError as e:
            with contextlib.suppress(OSError):  # closing flushes, and fails again on a full disk
                self._fh.close()
            self._fh = None
            raise OSError(e.errno, f"{e.strerror} (writing the activation cache)", str(self.folder / self._name)) from None

    def _close(self) -> None:
        assert self._fh is not None
        self._guard(self._fh.flush)
        self._guard(lambda: os.fsync(self._fh.fileno()))
        self._fh.close()
        self._fh = None
        path = self.folder / self._name
        size, sha = path.stat().st_size, sha256_file(path)
        self.done.append({"file": self._name, "tokens": self._rows, "bytes": size, "sha256": sha})

    def finish(self) -> list[dict]:
        if self._fh is not None or len(self.done) != len(self.sizes):
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
    targets: Sequence[tuple[HFSource, str, Optional[dict]]],
    root: Path,
    train_rows: int,
    heldout_rows: int,
    *,
    device: Any,
    progress: Optional[bool],
    shard_bytes: int,
) -> list[tuple[dict, bool]]:
    """Compute entries in temp folders and rename each into place; ``(manifest, ours)`` per target
    (see _publish). ``targets`` are ``(source, key, old manifest)`` that differ only in the hook:
    one LM pass fills them all. A single target growing an older entry reuses its full shards."""
    adir = root / "activations"
    tmps: list[Path] = []
    t0 = time.time()
    try:
        for _, key, _ in targets:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{host_name()}-{os.getpid()}-", dir=adir))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            tmps.append(tmp)
        source = targets[0][0]
        sites = [t[0].site for t in targets]
        producer = ActivationProducer(source, train_rows, heldout_rows, device=device, datasets_cache=root / "datasets")
        per = tokens_per_row(source)
        ids_infos = []
        for tmp in tmps:
            np.save(tmp / "heldout_ids.npy", producer.rows.heldout)
            ids_infos.append({"file": "heldout_ids.npy", "rows": heldout_rows, "bytes": (tmp / "heldout_ids.npy").stat().st_size,
                              "sha256": sha256_file(tmp / "heldout_ids.npy")})
        hooks = ", ".join(t[0].hook for t in targets)
        with _progress(progress, heldout_rows + train_rows, f"activations {hooks}") as advance:
            held = [_Writer(tmp, iter(["heldout.npy"]), [heldout_rows * per]) for tmp in tmps]
            for acts in producer.activations_by_site(producer.rows.heldout, sites):
                for w, site in zip(held, sites):
                    w.write(acts[site])
                advance(acts[sites[0]].shape[0] // per)
            held_infos = [w.finish()[0] for w in held]
            widths = [int(np.load(tmp / "heldout.npy", mmap_mode="r").shape[1]) for tmp in tmps]
            d = max(widths)  # hooks of one pass may differ in width (shards are sized by the widest)

            dtype = source.cache_dtype if source.cache_dtype in STORAGE else "float32"
            shard_rows = max(1, shard_bytes // (per * d * STORAGE[dtype].itemsize))
            reused: list[dict] = []
            old, final = targets[0][2], adir / targets[0][1]
            if len(targets) == 1 and old and old["d_in"] == d and old["train"]["shard_rows"] == shard_rows:
                full = [s for s in old["train"]["shards"] if s["tokens"] == shard_rows * per]
                for s in full[: train_rows // shard_rows]:
                    with contextlib.suppress(OSError):
                        os.link(final / s["file"], tmps[0] / s["file"])
                    if not (tmps[0] / s["file"]).exists():
                        shutil.copyfile(final / s["file"], tmps[0] / s["file"])
                    reused.append(s)
            skip = len(reused) * shard_rows
            advance(skip)
            n_shards = -(-train_rows // shard_rows)
            sizes = [min(shard_rows, train_rows - i * shard_rows) * per for i in range(len(reused), n_shards)]
            trains = [_Writer(tmp, (f"train-{i:05d}.npy" for i in itertools.count(len(reused))), sizes, dtype)
                      for tmp in tmps]
            rows = _advancing(itertools.islice(producer.rows.train, skip, None), advance)
            for acts in producer.activations_by_site(rows, sites):
                for w, site in zip(trains, sites):
                    w.write(acts[site])
            all_shards = [reused + w.finish() for w in trains]
        seconds = round(time.time() - t0, 3)
        out = []
        for (src, key, _), tmp, width, held_info, ids_info, shards in zip(targets, tmps, widths, held_infos, ids_infos,
                                                                          all_shards):
            arrays = [np.load(tmp / s["file"], mmap_mode="r") for s in shards]
            n_stats = min(train_rows * per, NORM_TOKENS)
            scale, mean = norm_stats(arrays, n_stats, dtype)
            del arrays
            manifest = {
                "format": FORMAT,
                "key": key,
                "key_fields": key_fields(src),
                "source": src.model_dump(mode="json", exclude={"lm_batch_size"}),
                "d_in": width,
                "dtype": dtype,
                "context_length": src.context_length,
                "tokens_per_row": per,
                "train": {"rows": train_rows, "tokens": train_rows * per, "shard_rows": shard_rows, "shards": shards},
                "heldout": {"rows": heldout_rows, "tokens": heldout_rows * per, "from": producer.rows.heldout_from,
                            "activations": held_info, "token_ids": ids_info},
                "stats": {"tokens": n_stats, "scale": scale, "mean": mean},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": seconds,
                "built_with": [t[1] for t in targets],  # the entries filled by the same LM pass
                "reused_shards": len(reused),
                "saesweep_version": _version(),
            }
            atomic_write_json(tmp / "manifest.json", manifest)
            out.append(_publish(tmp, adir, key, manifest))
        return out
    except BaseException:
        for tmp in tmps:
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


def _env_float(name: str) -> float:
    try:
        return float(env(name))
    except ValueError:
        raise ConfigError(f"${name}: expected a number of seconds, got {env(name)!r}") from None


def wait_for_entry(source: HFSource, root: Path, train_rows: int, heldout_rows: int, *,
                   timeout_s: Optional[float] = None, poll_s: Optional[float] = None,
                   echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> CacheEntry:
    """``cache_mode: wait``: the entry once some other process has built it; never builds.

    Raises :class:`ConfigError` after ``timeout_s`` (default ``$SAESWEEP_CACHE_WAIT_S``, see
    :mod:`saesweep.settings`) with what is there and how to fill the cache.
    """
    key = entry_key(source)
    adir = Path(root) / "activations"
    timeout_s = _env_float("SAESWEEP_CACHE_WAIT_S") if timeout_s is None else timeout_s
    poll_s = _env_float("SAESWEEP_CACHE_WAIT_POLL_S") if poll_s is None else poll_s
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
        ((manifest, ours),) = _build([(source, key, old)], Path(root), train_rows, heldout_rows,
                                     device=device, progress=progress, shard_bytes=shard_bytes or SHARD_BYTES)
        return CacheEntry(adir / key, manifest, built=ours)
    finally:
        held.__exit__(None, None, None)


def open_entries(sources: Sequence[HFSource], root: Path, train_rows: int, heldout_rows: int, *,
                 device: Any = "cpu", progress: Optional[bool] = None,
                 shard_bytes: Optional[int] = None) -> list[CacheEntry]:
    """The entries of several hooks of one model, dataset and token budget (``sources`` differ
    only in ``hook``), building the missing ones together: one LM pass for every hook. Each
    key's lock is held while it is built, as in :func:`open_entry`."""
    by_key = {entry_key(s): s for s in sources}  # resid_post of L and resid_pre of L + 1 share one
    adir = Path(root) / "activations"
    adir.mkdir(parents=True, exist_ok=True)
    found = {k: try_open(adir / k, train_rows, heldout_rows) for k in by_key}
    missing = sorted(k for k, e in found.items() if e is None)
    if missing:
        with contextlib.ExitStack() as stack:
            for k in missing:  # in key order, so that two builders cannot deadlock
                stack.enter_context(file_lock(adir / f"{k}.lock"))
            targets = []
            for k in missing:
                found[k] = try_open(adir / k, train_rows, heldout_rows)  # built meanwhile by another
                if found[k] is None:
                    _clear_stale(adir, k)
                    targets.append((by_key[k], k, read_manifest(adir / k)))
            if targets:
                olds = [t[2] for t in targets if t[2] is not None]
                train_rows = max([train_rows, *(o["train"]["rows"] for o in olds)])
                heldout_rows = max([heldout_rows, *(o["heldout"]["rows"] for o in olds)])
                built = _build(targets, Path(root), train_rows, heldout_rows, device=device, progress=progress,
                               shard_bytes=shard_bytes or SHARD_BYTES)
                for (_, k, _), (manifest, ours) in zip(targets, built):
                    found[k] = CacheEntry(adir / k, manifest, built=ours)
    return [found[entry_key(s)] for s in sources]


def pass_group(source: HFSource) -> str:
    """What the entries one LM pass can fill share: every key field but the hook point."""
    fields = {k: v for k, v in key_fields(source).items() if k not in ("layer", "hook")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def warm(configs: Sequence[Any], *, device: Any = "cpu", progress: Optional[bool] = None,
         only_shared: bool = False) -> list[dict]:
    """Build (or find) every entry the configs' hf sources need, each with the largest request
    among them, so that hosts with ``cache_mode: wait`` only read; the hooks of one model and
    dataset come from one LM pass. ``only_shared``: just the groups with several hooks (what a
    sweep does before its workers start). Returns one dict per entry."""
    from saesweep.data.budget import plan_activations

    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for cfg in configs:
        if getattr(cfg.source, "kind", None) != "hf":
            continue
        plan = plan_activations(cfg)  # the cache dtype, and whether only the streaming prefix is cached
        train_rows, heldout_rows = plan.cached_rows, plan.heldout_rows
        root = cache_root(cfg.cache_dir)
        g = groups.setdefault((str(root), pass_group(plan.source)), {"sources": {}, "train": 0, "heldout": 0})
        g["sources"].setdefault(entry_key(plan.source), plan.source)
        g["train"], g["heldout"] = max(g["train"], train_rows), max(g["heldout"], heldout_rows)
    out = []
    for (root, _), g in groups.items():
        sources = list(g["sources"].values())
        if only_shared and len(sources) < 2:
            continue
        t0 = time.perf_counter()
        entries = open_entries(sources, Path(root), g["train"], g["heldout"], device=device, progress=progress)
        for source, entry in zip(sources, entries):
            out.append({"key": entry.key, "root": root, "built": entry.built, "tokens": entry.train_tokens,
                        "model": source.model, "hook": source.hook, "dataset": source.dataset,
                        "seconds": round(time.perf_counter() - t0, 1), "path": str(entry.path)})
            entry.close()
    return out
