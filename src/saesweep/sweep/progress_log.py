"""Progress of a running sweep for output that is not a terminal (a log file, a pipe, a batch
job): each worker keeps a small file saying how far its pack is (:class:`PackProgress`), and the
sweep prints one plain line per interval from them and the store (:class:`ProgressLines`)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from saesweep.sweep.store import WAITING, SweepStore

PROGRESS_FOLDER = ".progress"
#: a progress file older than this is a worker that has stopped
PROGRESS_STALE_S = 120.0


def progress_folder(store: SweepStore) -> Path:
    """Where a sweep's workers say how far their packs are (one small JSON file each)."""
    ckpt = Path(store.info.get("checkpoint_dir", "runs/.checkpoints"))
    return ckpt.parent / PROGRESS_FOLDER


class PackProgress:
    """A worker's view of its running pack, written to its progress file at most every few
    seconds (from the trainer's log records)."""

    def __init__(self, folder: Path, worker: str, every_s: float = 0.5) -> None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in worker)
        self.path, self.worker, self.every_s = Path(folder) / f"{safe}.json", worker, every_s
        self._last = 0.0
        self.pack: dict[str, Any] = {}

    def start(self, trial_ids: list[str], steps: int, batch_size: int) -> None:
        self.pack = {"worker": self.worker, "trials": trial_ids, "members": len(trial_ids), "steps": steps,
                     "batch_size": batch_size, "step": 0, "started": time.time()}
        self._write(force=True)

    def log(self, config: Any, record: dict) -> None:
        step = int(record.get("step", 0)) + 1
        if self.pack and step > self.pack["step"]:
            self.pack["step"] = step
            self._write()

    def end(self) -> None:
        self.pack = {}
        self.path.unlink(missing_ok=True)
        try:  # the folder goes with the last worker's file
            self.path.parent.rmdir()
        except OSError:
            pass

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**self.pack, "t": now}))
            tmp.replace(self.path)
        except OSError:  # progress is a courtesy: never fail a pack over it
            pass


def read_progress(folder: Path) -> list[dict[str, Any]]:
    """The running packs' progress records (fresh ones only)."""
    out = []
    now = time.time()
    for f in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and now - float(rec.get("t", 0)) < PROGRESS_STALE_S and rec.get("trials"):
            out.append(rec)
    return out


def slot_of_worker(worker_id: Optional[str]) -> Optional[str]:
    """The slot in a worker id ``host:pid:slot:suffix`` (slots such as cpu:0 contain a colon)."""
    parts = (worker_id or "").split(":")
    return ":".join(parts[2:-1]) or None


def _as_dict(v: Any) -> dict:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return {}
    return v if isinstance(v, dict) else {}


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressLines:
    """One plain line per interval for a sweep whose output is not a terminal: packs running,
    trials done out of all, training tokens per second over the last interval, and the time left
    at that rate."""

    def __init__(self, store: SweepStore, echo=print) -> None:
        self.store, self.echo = store, echo
        self.folder = progress_folder(store)
        self.t0 = time.time()
        self._seen: dict[str, tuple[float, int]] = {}  # worker -> (time, SAE-tokens of its pack so far)
        self._rates: dict[str, float] = {}
        try:
            self.slots = [str(n) for n in (store.info.get("slots") or [])]
        except Exception:  # a transient storage error: the slots appear with their first trials
            self.slots = []

    def line(self) -> Optional[str]:
        try:
            recs = self.store.records()
            waiting_cfgs = [t.user_attrs.get("config") or {} for t in self.store.trials([WAITING])]
        except Exception:  # a transient storage error: skip this line
            return None
        states = Counter(r.state for r in recs)
        packs = read_progress(self.folder)
        now = time.time()
        rate_parts, left = [], 0.0
        for p in packs:
            done = int(p.get("step", 0)) * int(p.get("batch_size", 0)) * int(p.get("members", 1))
            at = float(p.get("t", now))  # when the worker wrote that step
            before = self._seen.get(p["worker"])
            if before is not None and at > before[0] and done >= before[1]:
                rate_parts.append((done - before[1]) / (at - before[0]))
                self._rates[p["worker"]] = rate_parts[-1]
            elif p["worker"] in self._rates:  # no newer step written since the last line
                rate_parts.append(self._rates[p["worker"]])
            elif done and at > float(p.get("started", at)):  # a first look: the pack's rate since it started
                rate_parts.append(done / (at - float(p["started"])))
            if before is None or at > before[0]:
                self._seen[p["worker"]] = (at, done)
            left += max(0, int(p.get("steps", 0)) - int(p.get("step", 0))) * int(p.get("batch_size", 0)) \
                * int(p.get("members", 1))
        per_trial = [float((c.get("train") or {}).get("tokens") or 0) for c in map(_as_dict, waiting_cfgs)]
        known = [p["steps"] * p["batch_size"] for p in packs if p.get("steps")]
        fallback = (sum(known) / len(known)) if known else 0.0
        left += sum(v or fallback for v in per_trial)
        rate = sum(rate_parts) if rate_parts else None
        total = len(recs)
        slots = Counter({name: 0 for name in self.slots})  # every slot of this run, from its first line
        slots.update(slot_of_worker(r.worker) or r.device or "?" for r in recs if r.state == "complete")
        text = (f"[{now - self.t0:6.0f}s] {states['complete']}/{total} complete, {states['running']} running, "
                f"{states['failed']} failed")
        if slots:
            text += "  |  " + "  ".join(f"{s} {n}" for s, n in sorted(slots.items()))
        text += f"  |  {len(packs)} pack(s) training ({sum(int(p.get('members', 1)) for p in packs)} trials)"
        if rate:
            text += f", {rate:,.0f} SAE-tok/s"
            if left:
                text += f", ETA {_duration(left / rate)}"
        return text

    def run(self, alive: Callable[[], bool], every_s: float, wait: Callable[[float], Any]) -> None:
        """Print a line every ``every_s`` while ``alive()``; ``wait(s)`` sleeps (returns early on a stop)."""
        self.line()  # the first sample: rates need two
        while alive():
            wait(every_s)
            if not alive():
                break
            text = self.line()
            if text:
                self.echo(text)
                sys.stdout.flush()


def log_lines(store: SweepStore, every_s: float, echo=print) -> Optional["LineThread"]:
    """When stdout is not a terminal: a started thread printing :class:`ProgressLines` every
    ``every_s`` until its :meth:`LineThread.stop`; None on a terminal (live bars show there)."""
    if sys.stdout.isatty():
        return None
    t = LineThread(ProgressLines(store, echo), every_s)
    t.start()
    return t


class LineThread(threading.Thread):
    def __init__(self, lines: ProgressLines, every_s: float) -> None:
        super().__init__(daemon=True, name="saesweep-progress")
        self.lines, self.every_s = lines, every_s
        self.done = threading.Event()

    def run(self) -> None:
        self.lines.run(lambda: not self.done.is_set(), self.every_s, self.done.wait)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
