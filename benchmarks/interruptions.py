#!/usr/bin/env python
"""Interrupted sweeps keep their work: N workers on PostgreSQL (a throwaway loopback server, as
the tests start one), interrupted in the middle of a sweep, then M workers finish it.

* ``--scenario sigterm`` (default): SIGTERM to every worker. Prints trials run twice, trials
  lost, the share of checkpointed steps the interrupted trials resumed from, checkpoints left,
  and the time from SIGTERM to the workers' exit.
* ``--scenario kill``: kill -9 every worker at a random point (10-40 s into the sweep), then
  again a few seconds after the next workers resumed the packs. Prints the share of each killed trial's trained steps that
  its next attempt resumes from (its rate taken from its final run; an estimate).
* ``--scenario outage``: the database stopped for ``--outage_s`` seconds mid-sweep, then
  started again. Prints workers that exited, trials trained twice, and the outage lines.

    python benchmarks/interruptions.py                 # 16 workers, then 4; 48 trials in packs of 3
    python benchmarks/interruptions.py --first 8 --then 2 --trials 24
    python benchmarks/interruptions.py --scenario kill --first 8 --then 8 --trials 24
    python benchmarks/interruptions.py --scenario outage --outage_s 30

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


def workers(n: int, url: str, name: str, cwd: Path, logs: Path | None = None) -> list[subprocess.Popen]:
    from saesweep.sweep.urls import password_to_env, split_password

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    password_to_env(url, env)
    out = []
    for i in range(n):
        err = open(logs / f"worker{i}-{time.time():.0f}.err", "w") if logs else subprocess.DEVNULL
        out.append(subprocess.Popen([sys.executable, "-m", "saesweep.sweep.worker_main", "--storage",
                                     split_password(url)[0], "--sweep", name, "--device", "cpu", "--slot", f"cpu:{i}",
                                     "--threads", "1"], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err))
    return out


def make_sweep(url: str, work: Path, args, **execution):
    from saesweep.config.sweep import expand, parse_spec
    from saesweep.sweep.worker import open_sweep, queue_trials

    lrs = [round(1e-3 * (1 + i), 6) for i in range(args.trials)]
    spec = parse_spec({
        "name": "cut", "storage": url, "output_dir": str(work / "runs"), "sae_types": ["relu"],
        "grids": {"relu": {"lr": lrs, "dict_size_ratio": [4.0], "sparsity_coeff": [0.1]}},
        "base": {"source": {"kind": "synthetic", "d_in": 8, "n_features": 16, "sparsity": 0.1},
                 "train": {"tokens": args.tokens, "batch_size": 512, "log_every": 100}, "eval": {"tokens": 512}},
        "execution": {"pack_size": 3, "heartbeat_s": 2, "lease_s": 20, **execution}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    return spec, store


def wait_for_checkpoints(ckpt_dir: Path, n: int, timeout: float = 600) -> None:
    from sweep_helpers import saved_steps

    deadline = time.time() + timeout
    while time.time() < deadline and len(saved_steps(ckpt_dir) if ckpt_dir.exists() else {}) < n:
        time.sleep(0.2)


def attempts_by_trial(store) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in store.trials():
        out.setdefault(t.user_attrs["trial_id"], []).append(t)
    return out


def sigterm(url: str, work: Path, args) -> None:
    from sweep_helpers import saved_steps

    from saesweep.sweep.store import COMPLETE, SweepStore

    spec, store = make_sweep(url, work, args, checkpoint_every_s=0.5)
    ckpt_dir = Path(store.info["checkpoint_dir"])
    procs = workers(args.first, url, spec.name, work)
    wait_for_checkpoints(ckpt_dir, args.first)
    time.sleep(1.0)
    t0 = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
    stop_s = time.time() - t0
    at_stop = saved_steps(ckpt_dir)
    done_before = sum(1 for t in store.trials([COMPLETE]))
    from saesweep.sweep.store import RUNNING

    held = len(store.trials([RUNNING]))  # left under a lease by workers that have exited
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
    print(f"  exit after SIGTERM: {stop_s:.1f} s for all {args.first} workers; trials left RUNNING (under a "
          f"lease) after they exited: {held}; the rest took {finish_s:.0f} s")
    print(f"  trials complete: {len(counts)} of {args.trials}; run twice: {sum(c > 1 for c in counts.values())}; "
          f"lost: {args.trials - len(counts)}")
    print(f"  interrupted trials: {len(at_stop)}; share of their checkpointed steps resumed: "
          f"min {min(kept, default=0):.2f}, mean {sum(kept) / max(1, len(kept)):.2f}; "
          f"resumed from step 0: {sum(k == 0 for k in kept)}")
    print(f"  checkpoint files left: {len(left)}; attempts per trial: {sorted({r.attempts for r in recs.values()})}")


def _killed(store, ckpt_dir: Path, t_kill: float, lease_s: float) -> list[dict]:
    """After a kill -9 and the lease: per killed trial, the step its re-queued attempt resumes from,
    when the killed attempt was claimed, and when that checkpoint was written."""
    import json

    from safetensors import safe_open

    from saesweep.sweep.store import RUNNING, WAITING

    running = {t.user_attrs["trial_id"]: t for t in store.trials([RUNNING])}
    time.sleep(max(0.0, t_kill + lease_s + 1 - time.time()))
    store.reap_expired(lease_s)
    out = []
    for t in store.trials([WAITING]):
        tid = t.user_attrs["trial_id"]
        if tid not in running:
            continue
        name, step, written = t.user_attrs.get("checkpoint"), 0, None
        path = ckpt_dir / name if name else None
        if path is not None and path.exists():
            with safe_open(str(path), "pt") as fh:
                meta = json.loads(fh.metadata()["saesweep"])
            if tid in meta["alive"]:
                step, written = int(meta["step"]), path.stat().st_mtime
        claimed = running[tid].datetime_start.timestamp() if running[tid].datetime_start else t_kill
        out.append({"trial_id": tid, "resumes_at": step, "claimed": claimed, "written": written, "killed": t_kill})
    return out


def kill(url: str, work: Path, args) -> None:
    import random

    from saesweep.sweep.store import RUNNING, SweepStore

    rng = random.Random(args.seed)
    spec, store = make_sweep(url, work, args)
    ckpt_dir = Path(store.info["checkpoint_dir"])
    lease_s = spec.execution.lease_s
    rounds = []
    procs = workers(args.first, url, spec.name, work)
    wait_for_checkpoints(ckpt_dir, 1)
    time.sleep(rng.uniform(10.0, 40.0))  # a random point of training
    t_kill = time.time()
    for p in procs:
        p.kill()
    rounds.append(("random point", _killed(store, ckpt_dir, t_kill, lease_s)))
    procs = workers(args.then, url, spec.name, work)
    deadline = time.time() + 120
    while time.time() < deadline and not store.trials([RUNNING]):
        time.sleep(0.1)
    time.sleep(rng.uniform(0.5, 3.0))  # right after the resume, before the new packs checkpoint
    t_kill = time.time()
    for p in procs:
        p.kill()
    rounds.append(("right after a resume", _killed(store, ckpt_dir, t_kill, lease_s)))
    for p in workers(args.then, url, spec.name, work):
        p.wait()
    store = SweepStore(url, spec.name, create=False)
    recs = {r.trial_id: r for r in store.records()}
    print(f"kill -9 of {args.first} workers at a random point, then of {args.then} workers right after they resumed "
          f"({args.trials} trials in packs of 3, checkpoint interval adaptive within "
          f"[{spec.execution.checkpoint_floor_s:g}, {spec.execution.checkpoint_every_s:g}] s):")
    all_kept = []
    for label, killed in rounds:
        kept, lost_s = [], []
        for k in killed:
            m = recs[k["trial_id"]].metrics
            steps = m.get("tokens", 0) / 512
            rate = (steps - m.get("resumed_from_step", 0)) / max(1e-9, m.get("train_time_s", 0.0))
            since = max(k["claimed"], k["written"] or 0.0)
            lost = rate * max(0.0, k["killed"] - since)
            # the trained steps at the kill: what it resumes from, plus what it trained since that
            # checkpoint (or since it was claimed, when this attempt wrote none)
            trained = (k["resumes_at"] if k["written"] and k["written"] > k["claimed"] else
                       max(k["resumes_at"], 0)) + lost
            kept.append(k["resumes_at"] / trained if trained > 0 else 1.0)
            lost_s.append(max(0.0, k["killed"] - since))
        all_kept += kept
        print(f"  {label}: {len(killed)} trials killed; share of trained steps kept: mean "
              f"{sum(kept) / max(1, len(kept)):.2f}, min {min(kept, default=0):.2f}; training lost per trial: "
              f"mean {sum(lost_s) / max(1, len(lost_s)):.1f} s, max {max(lost_s, default=0):.1f} s; from step 0: "
              f"{sum(k['resumes_at'] == 0 for k in killed)}")
    print(f"  overall: mean share kept {sum(all_kept) / max(1, len(all_kept)):.2f} over {len(all_kept)} killed trials; "
          f"complete {sum(r.state == 'complete' for r in recs.values())} of {args.trials}")


def outage(url: str, work: Path, args, server) -> None:
    from saesweep.sweep.store import COMPLETE, FAIL, SweepStore

    spec, store = make_sweep(url, work, args, outage_budget_s=args.budget_s)
    ckpt_dir = Path(store.info["checkpoint_dir"])
    logs = work / "logs"
    logs.mkdir()
    procs = workers(args.first, url, spec.name, work, logs)
    wait_for_checkpoints(ckpt_dir, args.first)
    done_before = sum(1 for _ in store.trials([COMPLETE]))
    store = None  # its connections die with the server
    server.pause()
    t0 = time.time()
    exited_during = []
    while time.time() - t0 < args.outage_s:
        exited_during = [i for i, p in enumerate(procs) if p.poll() is not None]
        time.sleep(0.5)
    server.start()
    back = time.time()
    codes = [p.wait() for p in procs]
    exited = [c for c in codes if c != 0]
    if exited:  # workers gave up (the outage outlasted their budget): fresh ones finish the sweep
        for p in workers(args.then, url, spec.name, work, logs):
            p.wait()
    finish_s = time.time() - back
    store = SweepStore(url, spec.name, create=False)
    by_trial = attempts_by_trial(store)
    complete = {tid for tid, ts in by_trial.items() if any(t.state == COMPLETE for t in ts)}
    # trained again: completed twice, or reaped and then completed by training rather than recorded
    # from the run folder its first worker left
    twice = [tid for tid, ts in by_trial.items()
             if sum(t.state == COMPLETE for t in ts) > 1
             or (any(t.state == FAIL and "lease expired" in str(t.user_attrs.get("reason", "")) for t in ts)
                 and not any(t.state == COMPLETE and t.user_attrs.get("adopted") for t in ts))]
    adopted = sum(1 for ts in by_trial.values() for t in ts if t.state == COMPLETE and t.user_attrs.get("adopted"))
    text = "".join(f.read_text() for f in logs.glob("*.err"))
    print(f"{args.first} workers on PostgreSQL ({args.trials} trials in packs of 3, lease {spec.execution.lease_s:g} s,"
          f" outage budget {spec.execution.outage_budget_s:g} s); database stopped for {args.outage_s:g} s after "
          f"{done_before} trials were complete:")
    print(f"  workers that exited during the outage: {len(exited_during)}; exit codes at the end: "
          f"{sorted(set(codes))}" + (f" ({len(exited)} gave up; {args.then} fresh workers finished)" if exited else "")
          + f"; the sweep finished {finish_s:.0f} s after the database came back")
    print(f"  trials complete: {len(complete)} of {args.trials}; trained twice: {len(twice)}; recorded from their "
          f"run folders: {adopted}")
    print(f"  worker lines: {text.count('database unreachable')} 'unreachable', "
          f"{text.count('reachable again')} 'reachable again', {text.count('stopping this worker')} 'stopping', "
          f"{text.count('Traceback')} tracebacks")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["sigterm", "kill", "outage"], default="sigterm")
    ap.add_argument("--first", type=int, default=16, help="workers before the interruption")
    ap.add_argument("--then", type=int, default=4, help="workers after it")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per trial")
    ap.add_argument("--outage_s", type=float, default=30.0, help="outage: seconds the database is stopped")
    ap.add_argument("--budget_s", type=float, default=600.0, help="outage: the workers' execution.outage_budget_s")
    ap.add_argument("--seed", type=int, default=0, help="kill: where the kills fall")
    args = ap.parse_args()
    from pg import PostgresServer

    server = PostgresServer()
    try:
        url = server.new_database()
        work = Path(tempfile.mkdtemp(prefix="saesweep-interrupt-"))
        if args.scenario == "sigterm":
            sigterm(url, work, args)
        elif args.scenario == "kill":
            kill(url, work, args)
        else:
            outage(url, work, args, server)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
