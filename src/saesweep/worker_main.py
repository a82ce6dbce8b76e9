"""One worker process on one device slot (started by the scheduler; see scheduler.py).

Stops cleanly on SIGTERM/SIGINT (checkpoint, requeue) and when its parent goes away.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="saesweep.worker_main")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slot", default="")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--assigned", action="store_true", help="take only the trials dealt to this slot")
    ap.add_argument("--share", type=int, default=1, help="workers sharing the queue (limits pack claims)")
    ap.add_argument("--run", default="", help="id of the scheduler run (for per-run stats)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .devices import Slot
    from .engine import SweepAborted, Worker
    from .grid import ExecutionSpec
    from .scheduler import ASSIGNMENT_ATTR, save_worker_stats
    from .store import SweepStore

    store = SweepStore(args.storage, args.sweep, create=False)
    info = store.info
    execution = ExecutionSpec.model_validate(info.get("spec", {}).get("execution", {}))
    accept = None
    if args.assigned:
        assignment = info.get(ASSIGNMENT_ATTR, {})
        accept = lambda t: assignment.get(t.user_attrs.get("trial_id")) == args.slot  # noqa: E731
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()

    def watchdog():
        while not stop.wait(2.0):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watchdog, daemon=True).start()
    kind = "cuda" if args.device.startswith("cuda") else args.device.split(":")[0]
    slot = Slot(args.slot or args.device, args.device, kind, args.threads)
    worker = Worker(store, execution, device=args.device, slot=slot.name, stop=stop, accept=accept, share=args.share)
    code = 0
    try:
        worker.run()
    except SweepAborted as e:
        print(f"saesweep worker {slot.name}: {e}", file=sys.stderr)
        code = 1
    finally:
        save_worker_stats(store, worker.stats, slot, args.run)
    return 130 if stop.is_set() and code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
