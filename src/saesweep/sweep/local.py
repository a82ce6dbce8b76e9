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
from saesweep.sweep.launcher import Launched, Launcher
from saesweep.sweep.display import (
    WORKER_STATS_PREFIX,
    save_worker_stats,
    stats_dict,
    watch,
)
from saesweep.sweep.planning import distribution_lines, round_robin
from saesweep.sweep.progress_log import log_lines
from saesweep.sweep.signals import SignalRelay
from saesweep.sweep.store import SweepStore
from saesweep.sweep.storages import secret_to_env, split_secret
from saesweep.sweep.urls import redact
from saesweep.sweep.worker import EXIT_OUTAGE, OutageAborted, SweepAborted, Worker

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
    outage: bool = False  # a worker gave up on an unreachable database

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.outage:
            return EXIT_OUTAGE
        return 0 if self.counts.get("failed", 0) == 0 and self.counts.get("waiting", 0) == 0 and not self.aborted else 1


# ------------------------------------------------------------------------ running
class LocalLauncher(Launcher):
    """One worker per device slot of this machine (the slots from :func:`.planning.plan_workers`),
    under the ``dynamic`` or ``round_robin`` policy. One CPU slot under ``dynamic`` runs in this
    process; otherwise each slot is a worker process the parent watches."""

    where = "this machine"

    def __init__(self, execution: ExecutionSpec, slots: Sequence[Slot], *, policy: str = "dynamic",
                 show_progress: Optional[bool] = None, echo=print):
        self.execution, self.slots, self.policy = execution, list(slots), policy
        self.show_progress, self.echo = show_progress, echo

    def describe(self, store_url: str, sweep: str) -> list[str]:
        lines = [f"Would run {len(self.slots)} worker(s) on {self.where} for sweep '{sweep}' on {redact(store_url)} "
                 f"({self.policy} policy)"]
        for slot in self.slots:
            extra = "".join([f", {slot.threads} thread(s)" if slot.threads else "",
                             f", packs of at most {slot.max_pack}" if slot.max_pack else ""])
            lines.append(f"  {slot.name}: {slot.device}{extra}")
        return lines

    def start(self, store: SweepStore) -> "LocalWorkers":
        store.reap_expired(self.execution.lease_s, self.execution.max_retries)
        store.set_info(**{SLOTS_ATTR: [s.name for s in self.slots]})
        if self.policy == "round_robin":
            assignment = round_robin(store, self.slots)
            for line in distribution_lines(assignment, self.slots):
                self.echo(line)
        if len(self.slots) == 1 and self.slots[0].kind == "cpu" and self.policy == "dynamic":
            return _InProcess(store, self.execution, self.slots[0], self.show_progress)
        return _Processes(store, self.execution, self.slots, self.policy, self.show_progress, self.echo)


class LocalWorkers(Launched):
    """Workers started on this machine; after :meth:`wait`, :attr:`outcome` says how they ended."""

    outcome: Optional[SweepOutcome] = None

    def wait(self) -> int:
        if self.outcome is None:
            self.outcome = self._wait()
        return self.outcome.exit_code

    def _wait(self) -> SweepOutcome:
        raise NotImplementedError


def run_workers(
    store: SweepStore,
    execution: ExecutionSpec,
    slots: Sequence[Slot],
    *,
    policy: str = "dynamic",
    show_progress: Optional[bool] = None,
    echo=print,
) -> SweepOutcome:
    """Start the slots' workers on this machine and wait for them (:class:`LocalLauncher`)."""
    launched = LocalLauncher(execution, slots, policy=policy, show_progress=show_progress, echo=echo).start(store)
    launched.wait()
    assert launched.outcome is not None
    return launched.outcome


class _InProcess(LocalWorkers):
    def __init__(self, store: SweepStore, execution: ExecutionSpec, slot: Slot, show_progress) -> None:
        self.store, self.execution, self.slot, self.show_progress = store, execution, slot, show_progress
        self.ids = [str(os.getpid())]

    def _wait(self) -> SweepOutcome:
        import torch

        store, slot = self.store, self.slot
        if slot.threads:
            torch.set_num_threads(slot.threads)
        stop = threading.Event()
        worker = Worker(store, self.execution, device=slot.device, slot=slot.name, show_progress=self.show_progress,
                        stop=stop, max_pack=slot.max_pack)
        interrupted = False
        aborted = None
        outage = False

        def on_signal(n: int) -> None:
            nonlocal interrupted
            interrupted = True
            stop.set()
            print("\nstopping: checkpointing the running pack (Ctrl-C again to abort)", file=sys.stderr)

        relay = SignalRelay(on_signal, raise_after=1)  # a second Ctrl-C aborts at once
        lines = log_lines(store, self.execution.progress_every_s)
        try:
            worker.run()
        except SweepAborted as e:
            aborted, outage = str(e), isinstance(e, OutageAborted)
        finally:
            if lines is not None:
                lines.stop()
            relay.restore()
            save_worker_stats(store, worker.stats, slot, "local")
        if outage:  # the database is away: nothing more can be read from it
            return SweepOutcome({}, [stats_dict(worker.stats, slot, "local")], aborted, interrupted, outage=True)
        return SweepOutcome(store.counts(), [stats_dict(worker.stats, slot, "local")], aborted, interrupted)


def _worker_command(store: SweepStore, slot: Slot, policy: str, share: int, run_id: str) -> list[str]:
    # the password (if any) travels in the environment (worker_env), never on a command line
    cmd = [sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", split_secret(store.url)[0], "--sweep", store.name,
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
        secret_to_env(store.url, env)
    if slot.threads:
        env.update(OMP_NUM_THREADS=str(slot.threads), MKL_NUM_THREADS=str(slot.threads))
    return env


class _Processes(LocalWorkers):
    """One worker process per slot, started at once; :meth:`wait` watches them and stops them on
    Ctrl-C or SIGTERM (a second one kills them)."""

    def __init__(self, store: SweepStore, execution: ExecutionSpec, slots: Sequence[Slot], policy: str,
                 show_progress, echo) -> None:
        self.store, self.slots, self.show_progress, self.echo = store, list(slots), show_progress, echo
        self.execution = execution
        self.run_id = uuid.uuid4().hex[:8]
        share = len(slots) if policy == "dynamic" else max(Counter(s.base for s in slots).values())
        self.stopping = threading.Event()
        self.kill = threading.Event()

        def on_signal(n: int) -> None:
            if n > 1:
                self.kill.set()
            self.stopping.set()

        self.relay = SignalRelay(on_signal)
        self.procs: list[tuple[Slot, subprocess.Popen]] = []
        try:
            for slot in slots:
                cmd = _worker_command(store, slot, policy, share, self.run_id)
                self.procs.append((slot, subprocess.Popen(cmd, env=worker_env(slot, store))))
        except BaseException:
            self._cleanup()
            raise
        self.ids = [str(p.pid) for _, p in self.procs]

    def _cleanup(self) -> None:
        for _, p in self.procs:  # an unexpected error: leave no worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
        self.relay.restore()

    def _wait(self) -> SweepOutcome:
        store, procs, echo = self.store, self.procs, self.echo
        try:
            lines = log_lines(store, self.execution.progress_every_s, echo)
            try:
                watch(store, procs, self.show_progress, self.stopping, echo)
            finally:
                if lines is not None:
                    lines.stop()
            if self.stopping.is_set():
                echo("\nstopping workers: they checkpoint their packs and requeue their trials (Ctrl-C again to kill them)")
                for _, p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = time.time() + 300
                while any(p.poll() is None for _, p in procs) and not self.kill.is_set() and time.time() < deadline:
                    time.sleep(0.1)
                for _, p in procs:
                    if p.poll() is None:
                        p.kill()
            codes = [p.wait() for _, p in procs]
        finally:
            self._cleanup()
        try:
            info = store.info
        except Exception:  # a database that stayed away: the workers said why
            info = {}
        workers = [v for k, v in info.items() if k.startswith(WORKER_STATS_PREFIX) and v.get("run") == self.run_id]
        aborted = next((w.get("aborted") for w in workers if w.get("aborted")), None)
        outage = EXIT_OUTAGE in codes
        bad = [(s.name, c) for (s, _), c in zip(procs, codes)
               if c not in (0, 1, 130, EXIT_OUTAGE, -signal.SIGTERM, -signal.SIGKILL)]
        if not aborted and bad and not self.stopping.is_set():
            aborted = f"worker {bad[0][0]} exited with code {bad[0][1]}"
        if outage and not aborted:
            aborted = "the sweep's database stayed unreachable past execution.outage_budget_s; run the same command " \
                      "again once it is back"
        try:
            counts = store.counts()
        except Exception:
            if not outage:
                raise
            counts = {}
        return SweepOutcome(counts, workers, aborted, self.stopping.is_set(), outage=outage)
