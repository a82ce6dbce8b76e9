"""Running a sweep's workers on this machine: one worker per device slot.

Two policies share the engine (claims, leases, packs):

* ``dynamic`` -- every worker pulls the next pack as soon as it is free, so the load balances
  by itself;
* ``round_robin`` -- the waiting trials are dealt to the slots in turn up front (the
  distribution is printed); each worker takes only its own.

With one CPU slot the worker runs in this process. Otherwise each slot gets a worker process
(``python -m saesweep.worker_main``) with its own environment (``CUDA_VISIBLE_DEVICES`` per GPU,
a thread count per CPU slot). The parent shows live progress from the store. Ctrl-C asks every
worker to stop: each checkpoints its pack and puts its trials back in the queue, so finished
trials stay recorded and running ones are picked up by the next run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .devices import Slot, cpu_slots, parse_devices
from .engine import SweepAborted, Worker, WorkerStats
from .grid import ExecutionSpec
from .store import SweepStore, redact

ASSIGNMENT_ATTR = "assignment"
WORKER_STATS_PREFIX = "worker:"


@dataclass
class SweepOutcome:
    counts: dict[str, int]
    workers: list[dict[str, Any]] = field(default_factory=list)
    aborted: Optional[str] = None
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.counts.get("failed", 0) == 0 and self.counts.get("waiting", 0) == 0 and not self.aborted else 1


def worker_slots(devices: str, max_parallel: Optional[int] = None) -> list[Slot]:
    """The slots for ``--devices`` and ``--max_parallel``: with more workers than devices, CPU
    cores are shared out among CPU workers and GPUs take several workers each."""
    slots = parse_devices(devices)
    n = max_parallel or len(slots)
    if n <= len(slots):
        return slots
    if all(s.kind == "cpu" for s in slots) and len(slots) == 1 and slots[0].name == "cpu":
        return cpu_slots(n)
    out = list(slots)
    i = 0
    while len(out) < n:
        s = slots[i % len(slots)]
        copies = sum(1 for o in out if o.name.split("#")[0] == s.name)
        out.append(Slot(f"{s.name}#{copies}", s.device, s.kind, s.threads, dict(s.env), s.total_bytes))
        i += 1
    return out


def round_robin(store: SweepStore, slots: Sequence[Slot]) -> dict[str, str]:
    """Deal the waiting trials to the slots in turn; stored with the sweep."""
    order: list[str] = []
    for r in store.records():
        if r.state == "waiting":
            order.append(r.trial_id)
    assignment = {tid: slots[i % len(slots)].name for i, tid in enumerate(order)}
    store.set_info(**{ASSIGNMENT_ATTR: assignment})
    return assignment


def distribution_lines(assignment: dict[str, str], slots: Sequence[Slot]) -> list[str]:
    counts = Counter(assignment.values())
    return ["Experiment distribution:"] + [f"  {s.name}: {counts.get(s.name, 0)} experiments" for s in slots]


# ------------------------------------------------------------------------ running
def run_workers(
    store: SweepStore,
    execution: ExecutionSpec,
    slots: Sequence[Slot],
    *,
    policy: str = "dynamic",
    show_progress: Optional[bool] = None,
    echo=print,
) -> SweepOutcome:
    store.reap_expired(execution.lease_s, execution.max_retries)
    if policy == "round_robin":
        assignment = round_robin(store, slots)
        for line in distribution_lines(assignment, slots):
            echo(line)
    if len(slots) == 1 and slots[0].kind != "cuda" and policy == "dynamic":
        return _run_in_process(store, execution, slots[0], show_progress)
    return _run_processes(store, execution, slots, policy, show_progress, echo)


def _run_in_process(store: SweepStore, execution: ExecutionSpec, slot: Slot, show_progress) -> SweepOutcome:
    import torch

    if slot.threads:
        torch.set_num_threads(slot.threads)
    stop = threading.Event()
    worker = Worker(store, execution, device=slot.device, slot=slot.name, show_progress=show_progress, stop=stop)
    interrupted = False
    aborted = None

    def on_sigint(signum, frame):
        nonlocal interrupted
        if stop.is_set():
            raise KeyboardInterrupt
        interrupted = True
        stop.set()
        print("\nstopping: checkpointing the running pack (Ctrl-C again to abort)", file=sys.stderr)

    old = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        worker.run()
    except SweepAborted as e:
        aborted = str(e)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
        save_worker_stats(store, worker.stats, slot, "local")
    return SweepOutcome(store.counts(), [stats_dict(worker.stats, slot)], aborted, interrupted)


def stats_dict(stats: WorkerStats, slot: Slot, run_id: str = "") -> dict[str, Any]:
    return {**stats.as_dict(), "slot": slot.name, "run": run_id, "finished": time.time(),
            "device": slot.device if slot.kind != "cuda" else slot.name}


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
        t = totals.setdefault(w.get("slot", "?"), {"slot": w.get("slot", "?"), "trials_done": 0, "trials_failed": 0,
                                                     "tokens": 0, "busy_s": 0.0, "wall_s": 0.0})
        for f in ("trials_done", "trials_failed", "tokens", "busy_s", "wall_s"):
            t[f] += w.get(f, 0) or 0
    for t in totals.values():
        t["tokens_per_s"] = t["tokens"] / t["busy_s"] if t["busy_s"] else 0.0
        t["busy_fraction"] = t["busy_s"] / t["wall_s"] if t["wall_s"] else 0.0
    return list(totals.values())


def _worker_command(store: SweepStore, slot: Slot, policy: str, share: int, run_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "saesweep.worker_main", "--storage", store.url, "--sweep", store.name,
           "--device", slot.device, "--slot", slot.name, "--share", str(share), "--run", run_id]
    if slot.threads:
        cmd += ["--threads", str(slot.threads)]
    if policy == "round_robin":
        cmd += ["--assigned"]
    return cmd


def _run_processes(store, execution, slots, policy, show_progress, echo) -> SweepOutcome:
    procs: list[tuple[Slot, subprocess.Popen]] = []
    run_id = uuid.uuid4().hex[:8]
    share = len(slots) if policy == "dynamic" else 1
    for slot in slots:
        env = {**os.environ, **slot.env}
        if slot.threads:
            env.update(OMP_NUM_THREADS=str(slot.threads), MKL_NUM_THREADS=str(slot.threads))
        procs.append((slot, subprocess.Popen(_worker_command(store, slot, policy, share, run_id), env=env)))
    interrupted = False
    try:
        _watch(store, procs, show_progress)
    except KeyboardInterrupt:
        interrupted = True
        echo("\nstopping workers: they checkpoint their packs and requeue their trials (Ctrl-C again to kill)")
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        try:
            for _, p in procs:
                p.wait(timeout=120)
        except KeyboardInterrupt:
            for _, p in procs:
                p.kill()
    codes = [p.wait() for _, p in procs]
    info = store.info
    workers = [v for k, v in info.items() if k.startswith(WORKER_STATS_PREFIX) and v.get("run") == run_id]
    aborted = next((w.get("aborted") for w in workers if w.get("aborted")), None)
    if not aborted and any(c not in (0, 1, 130, -signal.SIGTERM) for c in codes):
        aborted = f"a worker exited with code {[c for c in codes if c not in (0, 1)][0]}"
    return SweepOutcome(store.counts(), workers, aborted, interrupted)


def _watch(store: SweepStore, procs, show_progress) -> None:
    from .progress import is_terminal

    enabled = is_terminal() if show_progress is None else show_progress
    total = sum(store.counts().values())
    if not enabled:
        while any(p.poll() is None for _, p in procs):
            time.sleep(1.0)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("trials", total=total, detail="")
        while any(p.poll() is None for _, p in procs):
            recs = store.records()
            c = Counter(r.state for r in recs)
            per_dev = Counter(r.device for r in recs if r.state == "complete" and r.device)
            detail = f"running {c['running']}  failed {c['failed']}  " + "  ".join(f"{d}:{n}" for d, n in sorted(per_dev.items()))
            bar.update(task, completed=c["complete"] + c["failed"], total=len(recs), detail=detail)
            time.sleep(1.0)


def print_worker_table(workers: list[dict[str, Any]], echo=print) -> None:
    if not workers:
        return
    echo("Per-device performance:")
    echo(f"  {'slot':<12} {'done':>5} {'failed':>6} {'tokens/s':>12} {'busy':>6}")
    for w in sorted(workers, key=lambda w: w.get("slot", "")):
        echo(f"  {w.get('slot', '?'):<12} {w.get('trials_done', 0):>5} {w.get('trials_failed', 0):>6} "
             f"{w.get('tokens_per_s', 0):>12,.0f} {100 * w.get('busy_fraction', 0):>5.0f}%")
