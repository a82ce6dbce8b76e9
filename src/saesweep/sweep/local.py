"""Running a sweep's workers on this machine: one worker per device slot.

Two policies share the engine (claims, leases, packs):

* ``dynamic`` (the seed's multi-device scheduler) -- every worker pulls the next pack as soon
  as it is free, so the load balances by itself;
* ``round_robin`` (the seed's device-aware runner) -- the waiting trials are dealt to the
  devices in turn up front (the distribution is printed and stored with the sweep); each
  device's workers take only its trials. A trial nobody was dealt (queued or re-queued later)
  or one whose device ran out of memory on it may go to any device.

:func:`plan_workers` turns ``--devices`` and ``--max_parallel`` into worker slots. A GPU gets
several workers when the estimated memory of the sweep's largest pack (devices.py) fits
several times in it, and a pack-size cap when a full pack would not fit.

With one CPU slot and the dynamic policy the worker runs in this process. Otherwise each slot
gets a worker process (``python -m saesweep.sweep.worker_main``) with its own environment
(``CUDA_VISIBLE_DEVICES`` naming one GPU, or empty for a CPU worker; a thread count). The
parent shows live progress from the store. Ctrl-C (or SIGTERM) asks every worker to stop: each
checkpoints its pack and puts its trials back in the queue, so finished trials stay recorded
and running ones are picked up by the next run; a second Ctrl-C kills the workers (their
trials come back when their leases expire).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

from saesweep.config.sweep import ExecutionSpec
from saesweep.devices import (
    GB,
    Slot,
    cpu_slots,
    detect,
    estimate_pack_bytes,
    fmt_bytes,
    parse_devices,
)
from saesweep.progress import is_terminal, rich_progress
from saesweep.sweep.store import SweepStore
from saesweep.sweep.urls import password_to_env, split_password
from saesweep.sweep.worker import SweepAborted, Worker, WorkerStats

ASSIGNMENT_ATTR = "assignment"
SLOTS_ATTR = "slots"
WORKER_STATS_PREFIX = "worker:"
#: share of a device's memory that packs may plan to use (allocator fragmentation, other users)
MEMORY_SAFETY = 0.85
#: what each worker process spends on a GPU before its first tensor (CUDA context, cuBLAS workspace)
CUDA_CONTEXT_BYTES = 600 * 2**20
#: workers a GPU gets by default when the largest pack fits that many times
WORKERS_PER_GPU = 2
#: debug knob: ``SAESWEEP_SLOW_SLOTS="cpu:1=1.5"`` makes that slot's workers spend 1.5 s more per
#: trial (a slow device, for checking load balance); see worker_main.py
SLOW_SLOTS_ENV = "SAESWEEP_SLOW_SLOTS"


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


# ----------------------------------------------------------------------- planning
def pack_estimator(configs: Optional[Sequence[Any]]) -> Optional[Callable[[int], int]]:
    """``est(n)``: estimated bytes of the largest pack of at most ``n`` trials among ``configs``
    (one shape per pack group), or None when nothing can be estimated."""
    if not configs:
        return None

    groups: dict[str, list] = {}
    for c in configs:
        g = groups.setdefault(c.pack_key, [c, 0])
        g[1] += 1
    shapes = [(cfg, size) for cfg, size in groups.values()]
    if all(estimate_pack_bytes(c, 1) is None for c, _ in shapes):
        return None

    def est(n: int) -> int:
        return max((estimate_pack_bytes(cfg, min(n, size)) or 0) for cfg, size in shapes)

    return est


def _budget(slot: Slot, workers_on_device: int) -> Optional[float]:
    if not slot.total_bytes:
        return None
    per = slot.total_bytes * MEMORY_SAFETY / max(1, workers_on_device)
    return per - (CUDA_CONTEXT_BYTES if slot.kind == "cuda" else 0)


def plan_workers(devices: Optional[str], max_parallel: Optional[int] = None, configs: Optional[Sequence[Any]] = None,
                 execution: Optional[ExecutionSpec] = None, found=None) -> list[Slot]:
    """The worker slots for ``--devices`` and ``--max_parallel`` (None: decide), with pack caps.

    * Without ``max_parallel``: one worker per listed device; a GPU gets up to
      ``WORKERS_PER_GPU`` when the sweep's largest pack (plus a CUDA context) fits that many
      times in ``MEMORY_SAFETY`` of its memory.
    * With ``max_parallel`` above the number of devices: the extra workers go to the GPUs (or
      MPS) in turn; with CPUs only, the cores are shared out among that many CPU slots.
    * Every slot whose device memory is known gets ``max_pack``, the largest pack (up to the
      sweep's ``pack_size``) whose estimate fits its share, when a full pack would not.
    """
    found = list(detect(with_free=False)) if found is None else list(found)
    base = parse_devices(devices, found)
    pack_size = execution.pack_size if execution is not None else 16
    est = pack_estimator(configs)
    accel = [s for s in base if s.kind in ("cuda", "mps")]
    count = {s.name: 1 for s in base}
    if max_parallel is None:
        for s in base:
            if s.kind == "cuda" and est is not None and s.total_bytes:
                fits = int(s.total_bytes * MEMORY_SAFETY // (est(pack_size) + CUDA_CONTEXT_BYTES))
                count[s.name] = max(1, min(WORKERS_PER_GPU, fits))
    elif max_parallel > len(base):
        if accel:
            for i in range(max_parallel - len(base)):
                count[accel[i % len(accel)].name] += 1
        elif len(base) == 1 and base[0].name == "cpu" and base[0].threads:
            base = cpu_slots(max_parallel, found)
            count = {s.name: 1 for s in base}
        else:  # cpu:0,cpu:1 and more workers asked: more CPU slots sharing the cores
            names = [s.name for s in base] + [f"cpu:{i}" for i in range(len(base), max_parallel)]
            base = parse_devices(",".join(names), found)
            count = {s.name: 1 for s in base}
    n_workers = sum(count.values())
    cores = next((d.cores for d in found if d.kind == "cpu"), None) or 1
    cpu_workers = sum(1 for s in base if s.kind == "cpu")
    out: list[Slot] = []
    for s in base:
        k = count[s.name]
        on_device = cpu_workers if s.kind == "cpu" else k
        budget = _budget(s, on_device)
        cap, need = None, None
        if est is not None and budget is not None:
            cap = max([n for n in range(1, pack_size + 1) if est(n) <= budget] or [1])
            need = est(cap)
            cap = cap if cap < pack_size or need > budget else None
        threads = s.threads
        if s.kind != "cpu":  # accelerator workers still feed data from the CPU: share the cores
            threads = max(1, cores // n_workers)
        for j in range(k):
            name = s.name if j == 0 else f"{s.name}#{j}"
            out.append(replace(s, name=name, threads=threads, env=dict(s.env), max_pack=cap, pack_bytes=need))
    return out


def device_names(slots: Sequence[Slot]) -> list[str]:
    """The devices the slots are on, in order, once each (``Using devices: [...]``)."""
    return list(dict.fromkeys(s.base for s in slots))


def plan_lines(slots: Sequence[Slot], pack_size: int) -> list[str]:
    """What each device gets, when it is more than one plain worker: workers, pack cap, memory."""
    lines = []
    for dev in device_names(slots):
        mine = [s for s in slots if s.base == dev]
        s = mine[0]
        if len(mine) == 1 and s.max_pack is None and s.kind == "cpu":
            continue
        parts = [f"{len(mine)} worker{'s' if len(mine) > 1 else ''}"]
        if s.threads and s.kind == "cpu":
            parts[0] += f" x {s.threads} threads"
        pack = s.max_pack or pack_size
        if s.pack_bytes is not None:
            parts.append(f"packs of up to {pack} (~{fmt_bytes(s.pack_bytes)} each)")
        elif s.max_pack:
            parts.append(f"packs of up to {pack}")
        if s.total_bytes:
            parts.append(f"{s.total_bytes / GB:.1f}GB on the device")
        warn = ""
        if s.pack_bytes is not None and s.total_bytes and s.pack_bytes > (_budget(s, len(mine)) or 0):
            warn = "  (warning: one trial may not fit; out-of-memory trials move to another device)"
        lines.append(f"  {dev}: " + ", ".join(parts) + warn)
    return lines


def deal(trial_ids: Sequence[str], slots: Sequence[Slot]) -> dict[str, str]:
    """Round-robin: trial i goes to device i mod (number of devices)."""
    devs = device_names(slots)
    return {tid: devs[i % len(devs)] for i, tid in enumerate(trial_ids)}


def round_robin(store: SweepStore, slots: Sequence[Slot]) -> dict[str, str]:
    """Deal the waiting trials to the devices in turn; stored with the sweep."""
    order = [r.trial_id for r in store.records() if r.state == "waiting"]
    assignment = deal(order, slots)
    store.set_info(**{ASSIGNMENT_ATTR: assignment})
    return assignment


def distribution_lines(assignment: dict[str, str], slots: Sequence[Slot]) -> list[str]:
    counts = Counter(assignment.values())
    return ["Experiment distribution:"] + [f"  {d}: {counts.get(d, 0)} experiments" for d in device_names(slots)]


def assigned_to(assignment: dict[str, str], device: str) -> Callable[[Any], bool]:
    """A worker's filter under round_robin: its device's trials; trials dealt to nobody; and
    trials whose device ran out of memory on them (they may run anywhere else)."""

    def accept(t) -> bool:
        owner = assignment.get(t.user_attrs.get("trial_id"))
        if owner is None or owner == device:
            return True
        return owner in {a.split("#")[0] for a in t.user_attrs.get("avoid", ())}

    return accept


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
    store.set_info(**{SLOTS_ATTR: [s.name for s in slots]})
    if policy == "round_robin":
        assignment = round_robin(store, slots)
        for line in distribution_lines(assignment, slots):
            echo(line)
    if len(slots) == 1 and slots[0].kind == "cpu" and policy == "dynamic":
        return _run_in_process(store, execution, slots[0], show_progress)
    return _run_processes(store, execution, slots, policy, show_progress, echo)


def _run_in_process(store: SweepStore, execution: ExecutionSpec, slot: Slot, show_progress) -> SweepOutcome:
    import torch

    if slot.threads:
        torch.set_num_threads(slot.threads)
    stop = threading.Event()
    worker = Worker(store, execution, device=slot.device, slot=slot.name, show_progress=show_progress, stop=stop,
                    max_pack=slot.max_pack)
    interrupted = False
    aborted = None

    def on_signal(signum, frame):
        nonlocal interrupted
        if stop.is_set():
            raise KeyboardInterrupt
        interrupted = True
        stop.set()
        print("\nstopping: checkpointing the running pack (Ctrl-C again to abort)", file=sys.stderr)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        worker.run()
    except SweepAborted as e:
        aborted = str(e)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        save_worker_stats(store, worker.stats, slot, "local")
    return SweepOutcome(store.counts(), [stats_dict(worker.stats, slot, "local")], aborted, interrupted)


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


def _worker_command(store: SweepStore, slot: Slot, policy: str, share: int, run_id: str) -> list[str]:
    # the password (if any) travels in the environment (worker_env), never on a command line
    cmd = [sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", split_password(store.url)[0], "--sweep", store.name,
           "--device", slot.device, "--slot", slot.name, "--share", str(share), "--run", run_id]
    if slot.threads:
        cmd += ["--threads", str(slot.threads)]
    if slot.max_pack:
        cmd += ["--max_pack", str(slot.max_pack)]
    if policy == "round_robin":
        cmd += ["--assigned"]
    return cmd


def worker_env(slot: Slot, store: Optional[SweepStore] = None) -> dict[str, str]:
    """A worker's environment: only its GPU visible (none for a CPU worker), its thread count,
    and the storage password as PGPASSWORD (kept off the command line)."""
    env = {**os.environ, **slot.env}
    if store is not None:
        password_to_env(store.url, env)
    if slot.threads:
        env.update(OMP_NUM_THREADS=str(slot.threads), MKL_NUM_THREADS=str(slot.threads))
    return env


def _run_processes(store, execution, slots, policy, show_progress, echo) -> SweepOutcome:
    run_id = uuid.uuid4().hex[:8]
    share = len(slots) if policy == "dynamic" else max(Counter(s.base for s in slots).values())
    stopping = threading.Event()
    kill = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            kill.set()
        stopping.set()

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    procs: list[tuple[Slot, subprocess.Popen]] = []
    try:
        for slot in slots:
            procs.append((slot, subprocess.Popen(_worker_command(store, slot, policy, share, run_id), env=worker_env(slot, store))))
        _watch(store, procs, show_progress, stopping, echo)
        if stopping.is_set():
            echo("\nstopping workers: they checkpoint their packs and requeue their trials (Ctrl-C again to kill them)")
            for _, p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.time() + 300
            while any(p.poll() is None for _, p in procs) and not kill.is_set() and time.time() < deadline:
                time.sleep(0.1)
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
        codes = [p.wait() for _, p in procs]
    finally:
        for _, p in procs:  # an unexpected error here: leave no worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
    info = store.info
    workers = [v for k, v in info.items() if k.startswith(WORKER_STATS_PREFIX) and v.get("run") == run_id]
    aborted = next((w.get("aborted") for w in workers if w.get("aborted")), None)
    bad = [(s.name, c) for (s, _), c in zip(procs, codes) if c not in (0, 1, 130, -signal.SIGTERM, -signal.SIGKILL)]
    if not aborted and bad and not stopping.is_set():
        aborted = f"worker {bad[0][0]} exited with code {bad[0][1]}"
    return SweepOutcome(store.counts(), workers, aborted, stopping.is_set())


def slot_of_worker(worker_id: Optional[str]) -> Optional[str]:
    """The slot in a worker id ``host:pid:slot:suffix`` (slots such as cpu:0 contain a colon)."""
    if not worker_id:
        return None
    parts = worker_id.split(":")
    return ":".join(parts[2:-1]) or None


def _snapshot(store: SweepStore) -> tuple[Counter, Counter, int]:
    recs = store.records()
    states = Counter(r.state for r in recs)
    per_slot = Counter(slot_of_worker(r.worker) or r.device or "?" for r in recs if r.state == "complete")
    return states, per_slot, len(recs)


def _watch(store: SweepStore, procs, show_progress, stopping: threading.Event, echo) -> None:
    """Live progress until every worker has exited (or a stop is asked): a bar on a terminal,
    a line whenever the count of finished trials changes otherwise."""

    def alive() -> bool:
        return any(p.poll() is None for _, p in procs) and not stopping.is_set()

    enabled = is_terminal() if show_progress is None else show_progress
    t0 = time.time()
    if not enabled:
        last = None
        while alive():
            stopping.wait(1.0)
            try:
                states, per_slot, total = _snapshot(store)
            except Exception:  # a transient storage error: try again
                continue
            key = (states["complete"], states["failed"])
            if key != last and (states["complete"] or states["failed"]):
                last = key
                slots = "  ".join(f"{s} {n}" for s, n in sorted(per_slot.items()))
                echo(f"[{time.time() - t0:6.0f}s] {states['complete']}/{total} complete, {states['running']} running, "
                     f"{states['failed']} failed  |  {slots}")
                sys.stdout.flush()
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
    echo(f"  {'slot':<12} {'done':>5} {'failed':>6} {'packs':>5} {'tokens/s':>12} {'busy':>6} {'wall':>8}")
    for w in sorted(workers, key=lambda w: w.get("slot", "")):
        echo(f"  {w.get('slot', '?'):<12} {w.get('trials_done', 0):>5} {w.get('trials_failed', 0):>6} "
             f"{w.get('packs', 0):>5} {w.get('tokens_per_s', 0):>12,.0f} {100 * w.get('busy_fraction', 0):>5.0f}% "
             f"{w.get('wall_s', 0):>7.1f}s")
