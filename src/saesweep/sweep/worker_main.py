"""One worker process on one device slot (started by :mod:`saesweep.sweep.local`).

The scheduler gives it its device through the environment (``CUDA_VISIBLE_DEVICES`` naming one
GPU, so ``--device cuda:0`` is that GPU; empty for a CPU worker) and its thread count. It
stops cleanly on SIGTERM/SIGINT (checkpoint, requeue) and when its parent goes away.

Debug knob: ``SAESWEEP_SLOW_SLOTS="cpu:1=1.5,cuda:0=0.2"`` makes the named slots spend that
many more seconds per trial (counted as busy time), to check how the policies balance a slow
device.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

from saesweep.settings import env
from saesweep.sweep.signals import SignalRelay


def slow_slots(value: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (value or "").split(","):
        if "=" in item:
            name, secs = item.rsplit("=", 1)
            try:
                out[name.strip()] = float(secs)
            except ValueError:
                pass
    return out


def main(argv=None) -> int:
    from saesweep.training.allocator import tune_allocator

    tune_allocator()
    ap = argparse.ArgumentParser(prog="saesweep.sweep.worker_main")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slot", default="")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--assigned", action="store_true", help="take only the trials dealt to this slot's device")
    ap.add_argument("--share", type=int, default=1, help="workers sharing the queue (limits pack claims)")
    ap.add_argument("--max_pack", type=int, help="most trials in one pack on this slot (memory)")
    ap.add_argument("--run", default="", help="id of the scheduler run (for per-run stats)")
    args = ap.parse_args(argv)

    stop = threading.Event()
    SignalRelay(lambda n: stop.set())  # before the slow imports: a stop asked at start-up is kept

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from saesweep.config.sweep import ExecutionSpec
    from saesweep.devices import Slot
    from saesweep.sweep.display import save_worker_stats
    from saesweep.sweep.local import SLOW_SLOTS_ENV
    from saesweep.sweep.planning import ASSIGNMENT_ATTR, assigned_to
    from saesweep.sweep.worker import EXIT_OUTAGE, SweepAborted, Worker

    kind = "cuda" if args.device.startswith("cuda") else args.device.split(":")[0]
    slot = Slot(args.slot or args.device, args.device, kind, args.threads, max_pack=args.max_pack)
    if kind == "cuda" and not torch.cuda.is_available():
        print(f"saesweep worker {slot.name}: torch {torch.__version__} cannot use CUDA here "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})", file=sys.stderr)
        return 2
    store, info = open_store(args.storage, args.sweep, slot.name, stop=stop)
    execution = ExecutionSpec.model_validate(info.get("spec", {}).get("execution", {}))
    accept = assigned_to(info.get(ASSIGNMENT_ATTR, {}), slot.base) if args.assigned else None
    parent = os.getppid()

    def watchdog():
        while not stop.wait(2.0):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watchdog, daemon=True).start()
    worker = Worker(store, execution, device=args.device, slot=slot.name, stop=stop, accept=accept, share=args.share,
                    max_pack=args.max_pack, slow_s=slow_slots(env(SLOW_SLOTS_ENV)).get(slot.name, 0.0))
    code = 0
    try:
        worker.run()
    except SweepAborted as e:
        print(f"saesweep worker {slot.name}: {e}", file=sys.stderr)
        code = e.exit_code
    finally:
        try:
            save_worker_stats(store, worker.stats, slot, args.run)
        except Exception as e:  # the database is still away: the stats are only for the report
            if not store.backend.is_retryable(e) and code != EXIT_OUTAGE:
                raise
        if worker.tracker is not None:
            worker.tracker.close()
    return 130 if stop.is_set() and code == 0 else code


def open_store(storage: str, sweep: str, label: str, budget_s: float = 600.0, stop: threading.Event | None = None):
    """The sweep's store and its info. A worker may start while the database restarts (a job
    scheduled during a failover): an unreachable server is waited for, with backoff and one
    line, for up to ``budget_s`` (the sweep's own outage budget is in the database)."""
    import tenacity

    from saesweep.sweep.storages.base import Unreachable
    from saesweep.sweep.store import RETRY_MAX_WAIT_S, SweepStore

    event = stop or threading.Event()
    state: dict[str, Any] = {}

    def opened() -> tuple[Any, dict]:
        state["store"] = SweepStore(storage, sweep, create=False)
        return state["store"], state["store"].info

    def retryable(e: BaseException) -> bool:
        return isinstance(e, Unreachable) or ("store" in state and state["store"].backend.is_retryable(e))

    def pause(seconds: float) -> None:  # a stop asked meanwhile ends the wait
        event.wait(seconds)

    def say(_: tenacity.RetryCallState) -> None:
        if not state.get("said"):
            state["said"] = True
            print(f"saesweep worker {label}: database unreachable at start; waiting up to {budget_s:.0f}s for it",
                  file=sys.stderr)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retryable),
        wait=tenacity.wait_exponential(multiplier=1, min=1, max=RETRY_MAX_WAIT_S),
        stop=tenacity.stop_after_delay(budget_s) | tenacity.stop_when_event_set(event),
        before_sleep=say, sleep=pause, reraise=True)
    store, info = retrying(opened)
    if state.get("said"):  # it waited out an outage: the workers that trained through it get a lease's
        store.note_outage_end()  # time to heartbeat again before this one reaps their trials
    return store, info


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is recorded and closed: skip the interpreter's teardown, which spends seconds
    # collecting a trained pack's tensors after a stop was asked
    os._exit(code)
