"""Worker statistics (saved in the sweep by each worker) and what a running sweep shows: the live
trials bar, or a line per change off a terminal, and the per-device table."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from saesweep.devices import (
    Slot,
)
from saesweep.progress import is_terminal, rich_progress
from saesweep.sweep.progress_log import slot_of_worker
from saesweep.sweep.store import SweepStore
from saesweep.sweep.worker import WorkerStats

WORKER_STATS_PREFIX = "worker:"


def stats_dict(stats: WorkerStats, slot: Slot, run_id: str = "") -> dict[str, Any]:
    return {**stats.as_dict(), "slot": slot.name, "run": run_id, "finished": time.time(), "device": slot.base}


def save_worker_stats(store: SweepStore, stats: WorkerStats, slot: Slot, run_id: str = "") -> None:
    try:
        store.set_info(**{WORKER_STATS_PREFIX + stats.worker: stats_dict(stats, slot, run_id)})
    except Exception:
        pass


def per_slot_totals(store: SweepStore) -> list[dict[str, Any]]:
    """Worker stats of every run of the sweep, summed per slot."""
    totals: dict[str, dict[str, Any]] = {}
    for k, w in store.info.items():
        if not k.startswith(WORKER_STATS_PREFIX):
            continue
        slot = w.get("slot", "?")
        t = totals.setdefault(slot, {"slot": slot, "trials_done": 0, "trials_failed": 0, "packs": 0, "tokens": 0,
                                     "busy_s": 0.0, "wall_s": 0.0, "runs": 0})
        for f in ("trials_done", "trials_failed", "packs", "tokens", "busy_s", "wall_s"):
            t[f] += w.get(f, 0) or 0
        t["runs"] += 1
    for t in totals.values():
        t["tokens_per_s"] = t["tokens"] / t["busy_s"] if t["busy_s"] else 0.0
        t["busy_fraction"] = t["busy_s"] / t["wall_s"] if t["wall_s"] else 0.0
    return list(totals.values())


def _snapshot(store: SweepStore) -> tuple[Counter, Counter, int]:
    recs = store.records()
    states = Counter(r.state for r in recs)
    per_slot = Counter(slot_of_worker(r.worker) or r.device or "?" for r in recs if r.state == "complete")
    return states, per_slot, len(recs)


def watch(store: SweepStore, procs, show_progress, stopping: threading.Event, echo) -> None:
    """Wait until every worker has exited (or a stop is asked), with a live bar on a terminal."""

    def alive() -> bool:
        return any(p.poll() is None for _, p in procs) and not stopping.is_set()

    enabled = is_terminal() if show_progress is None else show_progress
    if not enabled:  # plain lines come from :mod:`.progress_log` when stdout is not a terminal
        while alive():
            stopping.wait(1.0)
        return
    with rich_progress("{task.fields[detail]}") as bar:
        task = bar.add_task("trials", total=None, detail="")
        while alive():
            try:
                states, per_slot, total = _snapshot(store)
            except Exception:
                stopping.wait(1.0)
                continue
            detail = f"running {states['running']}  failed {states['failed']}  " + \
                "  ".join(f"{s}:{n}" for s, n in sorted(per_slot.items()))
            bar.update(task, completed=states["complete"] + states["failed"], total=total, detail=detail)
            stopping.wait(1.0)


def print_worker_table(workers: list[dict[str, Any]], echo=print) -> None:
    """Per-device (per worker slot) performance: trials done, failures, packs, tokens/s, busy fraction."""
    if not workers:
        return
    echo("Per-device performance:")
    echo("  (SAE-tok/s: training tokens per second summed over the SAEs a slot trained at once)")
    echo(f"  {'slot':<12} {'done':>5} {'failed':>6} {'packs':>5} {'SAE-tok/s':>12} {'busy':>6} {'wall':>8}")
    for w in sorted(workers, key=lambda w: w.get("slot", "")):
        echo(f"  {w.get('slot', '?'):<12} {w.get('trials_done', 0):>5} {w.get('trials_failed', 0):>6} "
             f"{w.get('packs', 0):>5} {w.get('tokens_per_s', 0):>12,.0f} {100 * w.get('busy_fraction', 0):>5.0f}% "
             f"{w.get('wall_s', 0):>7.1f}s")

