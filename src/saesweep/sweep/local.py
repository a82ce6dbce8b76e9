"""Running a sweep's workers on this machine: one worker per device slot.

Two policies share the engine (claims, leases, packs):

* ``dynamic`` (the multi-device scheduler) -- every worker pulls the next pack as soon
  as it is free, so the load balances by itself;
* ``round_robin`` (the device-aware runner) -- the waiting trials are dealt to the
  devices in turn up front (the distribution is printed and stored with the sweep); each
  device's workers take only its trials. A trial nobody was dealt (queued or re-queued later)
  or one whose device ran out of memory on it may go to any device.

:func:`.planning.plan_workers` turns ``--devices`` and ``--max_parallel`` into worker slots. A GPU gets
several workers when the estimated memory of the sweep's largest pack (:mod:`saesweep.devices`) fits
several times in it, and a pack-size cap when a full pack would not fit.

With one CPU slot and the dynamic policy the worker runs in this process. Otherwise each slot
gets a worker process (``python -m saesweep.sweep.worker_main``) with its own environment
(``CUDA_VISIBLE_DEVICES`` naming one GPU, or empty for a CPU worker; a thread count). The
parent shows live progress from the store (:mod:`.display`). Ctrl-C (or SIGTERM) asks every worker to stop: each
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
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from saesweep.config.sweep import ExecutionSpec
from saesweep.devices import (
    Slot,
)
from saesweep.sweep.display import (
    WORKER_STATS_PREFIX,
    save_worker_stats,
    stats_dict,
    watch,
)
from saesweep.sweep.planning import distribution_lines, round_robin
from saesweep.sweep.signals import SignalRelay
from saesweep.sweep.store import SweepStore
from saesweep.sweep.urls import password_to_env, split_password
from saesweep.sweep.worker import SweepAborted, Worker

SLOTS_ATTR = "slots"
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

    def on_signal(n: int) -> None:
        nonlocal interrupted
        interrupted = True
        stop.set()
        print("\nstopping: checkpointing the running pack (Ctrl-C again to abort)", file=sys.stderr)

    relay = SignalRelay(on_signal, raise_after=1)  # a second Ctrl-C aborts at once
    try:
        worker.run()
    except SweepAborted as e:
        aborted = str(e)
    finally:
        relay.restore()
        save_worker_stats(store, worker.stats, slot, "local")
    return SweepOutcome(store.counts(), [stats_dict(worker.stats, slot, "local")], aborted, interrupted)


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

    def on_signal(n: int) -> None:
        if n > 1:
            kill.set()
        stopping.set()

    relay = SignalRelay(on_signal)
    procs: list[tuple[Slot, subprocess.Popen]] = []
    try:
        for slot in slots:
            procs.append((slot, subprocess.Popen(_worker_command(store, slot, policy, share, run_id), env=worker_env(slot, store))))
        watch(store, procs, show_progress, stopping, echo)
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
        relay.restore()
    info = store.info
    workers = [v for k, v in info.items() if k.startswith(WORKER_STATS_PREFIX) and v.get("run") == run_id]
    aborted = next((w.get("aborted") for w in workers if w.get("aborted")), None)
    bad = [(s.name, c) for (s, _), c in zip(procs, codes) if c not in (0, 1, 130, -signal.SIGTERM, -signal.SIGKILL)]
    if not aborted and bad and not stopping.is_set():
        aborted = f"worker {bad[0][0]} exited with code {bad[0][1]}"
    return SweepOutcome(store.counts(), workers, aborted, stopping.is_set())


