#!/usr/bin/env python
"""Interrupted sweeps keep their work: N workers on PostgreSQL (a throwaway loopback server, as
the tests start one) stopped with SIGTERM in the middle of a sweep, then M workers finish it.
Prints trials run twice, trials lost, the share of checkpointed steps the interrupted trials
resumed from, checkpoints left, and the time from SIGTERM to the workers' exit.

    python benchmarks/interruptions.py                 # 16 workers, then 4; 48 trials in packs of 3
    python benchmarks/interruptions.py --first 8 --then 2 --trials 24

Needs PostgreSQL's server binaries (initdb, pg_ctl) and psycopg (``pip install 'saesweep[postgres]'``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def workers(n: int, url: str, name: str, cwd: Path) -> list[subprocess.Popen]:
    from saesweep.sweep.urls import password_to_env, split_password

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    password_to_env(url, env)
    return [subprocess.Popen([sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", split_password(url)[0],
                              "--sweep", name, "--device", "cpu", "--slot", f"cpu:{i}", "--threads", "1"],
                             cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=16, help="workers before the interruption")
    ap.add_argument("--then", type=int, default=4, help="workers after it")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per trial")
    args = ap.parse_args()
    from pg import PostgresServer
    from sweep_helpers import saved_steps

    from saesweep.config.sweep import expand, parse_spec
    from saesweep.sweep.store import COMPLETE, SweepStore
    from saesweep.sweep.worker import open_sweep, queue_trials

    server = PostgresServer()
    try:
        url = server.new_database()
        work = Path(tempfile.mkdtemp(prefix="saesweep-interrupt-"))
        lrs = [round(1e-3 * (1 + i), 6) for i in range(args.trials)]
        spec = parse_spec({
            "name": "cut", "storage": url, "output_dir": str(work / "runs"), "sae_types": ["relu"],
            "grids": {"relu": {"lr": lrs, "dict_size_ratio": [4.0], "sparsity_coeff": [0.1]}},
            "base": {"source": {"kind": "synthetic", "d_in": 8, "n_features": 16, "sparsity": 0.1},
                     "train": {"tokens": args.tokens, "batch_size": 512, "log_every": 100}, "eval": {"tokens": 512}},
            "execution": {"pack_size": 3, "checkpoint_every_s": 0.5, "heartbeat_s": 2, "lease_s": 20}})
        store = open_sweep(spec)
        queue_trials(store, spec, expand(spec))
        ckpt_dir = Path(store.info["checkpoint_dir"])
        procs = workers(args.first, url, spec.name, work)
        deadline = time.time() + 600
        while time.time() < deadline and len(saved_steps(ckpt_dir) if ckpt_dir.exists() else {}) < args.first:
            time.sleep(0.2)
        time.sleep(1.0)
        t0 = time.time()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        stop_s = time.time() - t0
        at_stop = saved_steps(ckpt_dir)
        done_before = sum(1 for t in store.trials([COMPLETE]))
        t1 = time.time()
        for p in workers(args.then, url, spec.name, work):
            p.wait()
        finish_s = time.time() - t1
        store = SweepStore(url, spec.name, create=False)
        counts: dict[str, int] = {}
        for t in store.trials([COMPLETE]):
            counts[t.user_attrs["trial_id"]] = counts.get(t.user_attrs["trial_id"], 0) + 1
        recs = {r.trial_id: r for r in store.records()}
        kept = [recs[t].metrics.get("resumed_from_step", 0) / s for t, s in at_stop.items() if s and t in recs]
        left = list(ckpt_dir.glob("*")) if ckpt_dir.exists() else []
        print(f"{args.first} workers on PostgreSQL, SIGTERM after {len(at_stop)} trials had checkpoints "
              f"({done_before} complete), then {args.then} workers:")
        print(f"  exit after SIGTERM: {stop_s:.1f} s for all {args.first} workers; the rest took {finish_s:.0f} s")
        print(f"  trials complete: {len(counts)} of {args.trials}; run twice: {sum(c > 1 for c in counts.values())}; "
              f"lost: {args.trials - len(counts)}")
        print(f"  interrupted trials: {len(at_stop)}; share of their checkpointed steps resumed: "
              f"min {min(kept, default=0):.2f}, mean {sum(kept) / max(1, len(kept)):.2f}; "
              f"resumed from step 0: {sum(k == 0 for k in kept)}")
        print(f"  checkpoint files left: {len(left)}; attempts per trial: "
              f"{sorted({r.attempts for r in recs.values()})}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
