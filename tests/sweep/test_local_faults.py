"""Device faults: out-of-memory packs and trials, and Ctrl-C on a multi-worker sweep.

Out of memory cannot be provoked on a CPU without exhausting the machine, so the training call
raises the error CUDA raises (``torch.OutOfMemoryError``) in an in-process worker; everything
else (store, claims, retries, the next training) is real. Ctrl-C is a real SIGINT to the process
group of a real ``saesweep sweep --devices cpu:0,cpu:1``, as a terminal sends it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from sweep_helpers import (
    TINY_BASE,
    complete_count_by_trial,
    env,
    saesweep,
    saved_steps,
    write_spec,
)

from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep import worker as worker_module
from saesweep.sweep.local import SLOTS_ATTR
from saesweep.sweep.planning import assigned_to
from saesweep.sweep.store import COMPLETE, FAIL, SweepStore
from saesweep.sweep.worker import SweepAborted, Worker, open_sweep, queue_trials

REAL_RUN_PACK = worker_module.run_pack


def tiny_sweep(tmp_path, n: int, pack_size: int):
    spec = parse_spec({"name": "oom", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [1e-3 * (i + 1) for i in range(n)], "dict_size_ratio": [2.0],
                                          "sparsity_coeff": [0.1]}},
                       "execution": {"pack_size": pack_size, "lease_s": 30, "heartbeat_s": 0.5}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    return spec, store


class FakeOOM:
    """run_pack that raises CUDA's out-of-memory error when ``when(configs)``; it first allocates
    a tensor (the memory of the failed attempt) and checks that the previous one was released."""

    def __init__(self, when):
        self.when, self.sizes, self.leaked = when, [], []
        self.real = REAL_RUN_PACK
        self.last: weakref.ref | None = None

    def __call__(self, configs, **kw):
        self.sizes.append(len(configs))
        if self.last is not None and self.last() is not None:
            self.leaked.append(len(configs))  # the failed attempt's tensors still alive during the retry
        if self.when(configs):
            activations = torch.empty(len(configs), 1 << 20)
            self.last = weakref.ref(activations)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return self.real(configs, **kw)


def test_oom_splits_the_pack_and_frees_the_failed_attempt(tmp_path, monkeypatch):
    spec, store = tiny_sweep(tmp_path, n=4, pack_size=4)
    store.set_info(**{SLOTS_ATTR: ["cuda:0"]})
    fake = FakeOOM(lambda cfgs: len(cfgs) > 1)  # only single trials fit on this "device"
    monkeypatch.setattr(worker_module, "run_pack", fake)
    w = Worker(store, spec.execution, device="cpu", slot="cuda:0", poll_s=0.1)
    w.run()
    assert fake.sizes[:3] == [4, 2, 1]  # split in halves until it fits
    assert fake.leaked == []
    assert w.ex.pack_size == 1  # this worker now claims packs that fit
    assert store.counts()["complete"] == 4 and w.stats.trials_failed == 0
    assert set(complete_count_by_trial(store).values()) == {1}
    for t in store.trials([COMPLETE]):
        assert t.user_attrs["attempt"] == 1  # a split is not an attempt
    splits = [t.user_attrs["reason"] for t in store.trials([FAIL])]
    assert len(splits) == 3 and all("pack split" in r for r in splits)


def test_a_slot_pack_cap_limits_the_packs_it_claims(tmp_path, monkeypatch):
    spec, store = tiny_sweep(tmp_path, n=5, pack_size=4)
    sizes = FakeOOM(lambda cfgs: False)
    monkeypatch.setattr(worker_module, "run_pack", sizes)
    w = Worker(store, spec.execution, device="cpu", slot="cuda:0", poll_s=0.1, max_pack=2)
    assert w.ex.pack_size == 2 and spec.execution.pack_size == 4
    w.run()
    assert sizes.sizes == [2, 2, 1] and store.counts()["complete"] == 5


def test_oom_of_one_trial_moves_it_to_another_slot(tmp_path, monkeypatch):
    spec, store = tiny_sweep(tmp_path, n=2, pack_size=1)
    store.set_info(**{SLOTS_ATTR: ["cuda:0", "cuda:1"]})
    monkeypatch.setattr(worker_module, "run_pack", FakeOOM(lambda cfgs: True))
    small = Worker(store, spec.execution, device="cpu", slot="cuda:0", poll_s=0.1)
    small.run()  # runs out of memory on both, then finds nothing it may take and stops
    assert store.counts() == {"waiting": 2, "running": 0, "complete": 0, "failed": 0, "pruned": 0}
    assert small.stats.trials_failed == 2
    for t in store.trials([FAIL]):
        assert t.user_attrs["reason"] == "out of memory on cuda:0; retried on another slot"
    monkeypatch.setattr(worker_module, "run_pack", REAL_RUN_PACK)
    big = Worker(store, spec.execution, device="cpu", slot="cuda:1", poll_s=0.1)
    big.run()
    assert big.stats.trials_done == 2
    assert store.counts()["complete"] == 2
    for t in store.trials([COMPLETE]):
        assert t.user_attrs["attempt"] == 1 and t.user_attrs["avoid"] == ["cuda:0"]


def test_oom_on_every_slot_fails_the_trial(tmp_path, monkeypatch):
    spec, store = tiny_sweep(tmp_path, n=1, pack_size=1)
    store.set_info(**{SLOTS_ATTR: ["cuda:0", "cuda:1"]})
    monkeypatch.setattr(worker_module, "run_pack", FakeOOM(lambda cfgs: True))
    for slot in ("cuda:0", "cuda:1"):
        Worker(store, spec.execution, device="cpu", slot=slot, poll_s=0.1).run()
    [rec] = store.records()
    assert rec.state == "failed" and rec.reason == "out of memory on every slot (cuda:0, cuda:1)"


def test_round_robin_filter():
    accept = assigned_to({"a": "cuda:0", "b": "cuda:1"}, "cuda:1")

    def trial(tid, avoid=()):
        return type("T", (), {"user_attrs": {"trial_id": tid, **({"avoid": list(avoid)} if avoid else {})}})

    assert accept(trial("b")) and not accept(trial("a"))
    assert accept(trial("c"))  # dealt to nobody (queued after the deal, or re-queued)
    assert accept(trial("a", avoid=["cuda:0#1"]))  # its device ran out of memory on it: anyone else


def test_ctrl_c_stops_all_workers_and_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during a two-worker sweep:
    exit 130, finished trials COMPLETE, running ones back to WAITING with their checkpoints;
    the same command again completes every trial exactly once, resuming the interrupted ones."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 900_000, "batch_size": 512, "log_every": 100}}
    write_spec(tmp_path, name="c", base=base, sae_types=["relu"],
               grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3], "dict_size_ratio": [4.0], "sparsity_coeff": [0.1]}},
               execution={"pack_size": 1, "checkpoint_every_s": 0.2, "heartbeat_s": 0.5})
    cmd = [sys.executable, "-m", "saesweep", "sweep", "--devices", "cpu:0,cpu:1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    journal = tmp_path / "runs" / "c" / "sweep.journal"
    ckpt_dir = tmp_path / "runs" / "c" / "checkpoints"
    store, deadline = None, time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not journal.exists():
            continue
        store = store or SweepStore(str(journal), "c", create=False)
        c = store.counts()
        if c["complete"] >= 1 and c["running"] == 2 and len(list(ckpt_dir.glob("*.safetensors"))) >= 2:
            break
    else:
        proc.kill()
        pytest.fail(f"never saw a finished trial with two running: {proc.communicate()}")
    running = {r.trial_id for r in store.records() if r.state == "running"}
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "run the same command again" in err

    store = SweepStore(str(journal), "c", create=False)
    recs = {r.trial_id: r for r in store.records()}
    assert sum(r.state == "complete" for r in recs.values()) >= 1
    assert all(r.state in ("complete", "waiting") for r in recs.values())  # nothing left running
    for tid in running - {t for t, r in recs.items() if r.state == "complete"}:
        assert recs[tid].state == "waiting"
        stopped = [t for t in store.trials([FAIL]) if t.user_attrs["trial_id"] == tid]
        assert stopped and "interrupted" in stopped[-1].user_attrs["reason"]
    assert len(list(ckpt_dir.glob("*.safetensors"))) >= 1
    finished = {t: r.number for t, r in recs.items() if r.state == "complete"}
    resumable = [t for t, r in recs.items() if r.state == "waiting" and t in running]
    assert resumable, "no trial was interrupted mid-training"

    again = saesweep("sweep", "--devices", "cpu:0,cpu:1", cwd=tmp_path, check=True, timeout=240)
    assert "6 complete, 0 failed" in again.stdout
    store = SweepStore(str(journal), "c", create=False)
    done = complete_count_by_trial(store)
    assert len(done) == 6 and set(done.values()) == {1}
    recs = {r.trial_id: r for r in store.records()}
    for tid, number in finished.items():
        assert recs[tid].number == number  # not run again
    for tid in resumable:
        assert recs[tid].metrics["resumed_from_step"] > 0  # picked up from its checkpoint
    for t in store.trials([COMPLETE]):
        assert t.user_attrs["attempt"] == 1  # a stop is not an attempt
    assert list(ckpt_dir.glob("*")) == []  # nothing left once the sweep is done


def test_an_interrupted_pack_resumes_with_another_worker_count(tmp_path):
    """A pack of 4 stopped mid-training by Ctrl-C, then the sweep run again on two workers:
    the four are claimed first, together, and resume from their step (nothing trained twice,
    no checkpoint left, status counts one attempt each)."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 600_000, "batch_size": 512, "log_every": 100}}
    write_spec(tmp_path, name="p", base=base, sae_types=["relu"],
               grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3], "dict_size_ratio": [4.0], "sparsity_coeff": [0.1]}},
               execution={"pack_size": 4, "checkpoint_every_s": 0.2, "heartbeat_s": 0.5})
    proc = subprocess.Popen([sys.executable, "-m", "saesweep", "sweep"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    journal = tmp_path / "runs" / "p" / "sweep.journal"
    ckpt_dir = tmp_path / "runs" / "p" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpt_dir.glob("*.safetensors")):
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    store = SweepStore(str(journal), "p", create=False)
    interrupted = {t.user_attrs["trial_id"] for t in store.trials([FAIL]) if "interrupted" in t.user_attrs["reason"]}
    assert len(interrupted) == 4
    status = saesweep("status", "runs/p", cwd=tmp_path, check=True)
    assert "checkpoints of interrupted packs: 1 file(s)" in status.stdout

    again = saesweep("sweep", "--devices", "cpu:0,cpu:1", cwd=tmp_path, check=True, timeout=240)
    assert "6 complete, 0 failed" in again.stdout
    store = SweepStore(str(journal), "p", create=False)
    assert set(complete_count_by_trial(store).values()) == {1} and len(complete_count_by_trial(store)) == 6
    recs = {r.trial_id: r for r in store.records()}
    for tid in interrupted:
        assert recs[tid].metrics["resumed_from_step"] > 0 and recs[tid].attempts == 1
    assert list(ckpt_dir.glob("*")) == []


def test_a_full_disk_stops_the_worker_at_once_and_fails_nothing(tmp_path, monkeypatch):
    import errno

    spec, store = tiny_sweep(tmp_path, n=4, pack_size=1)
    calls = []

    def full(configs, **kw):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.json")

    monkeypatch.setattr(worker_module, "run_pack", full)
    with pytest.raises(SweepAborted, match="disk full"):
        Worker(store, spec.execution, device="cpu", poll_s=0.1).run()
    assert len(calls) == 1  # the first ENOSPC stops it
    c = store.counts()
    assert c["waiting"] == 4 and c["failed"] == 0 and c["running"] == 0
    assert all(r.attempts <= 1 for r in store.records())


def test_random_interruptions_keep_the_trained_steps(tmp_path):
    """SIGTERM, then kill -9, each at a random point of a two-worker sweep in packs of 3; each
    time it is started again with another worker count. In the end every trial is complete
    exactly once, interrupted trials resumed >= 90 % of the steps they had trained, and no
    checkpoint is left."""
    rng = random.Random(1234)
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 3_000_000, "batch_size": 512, "log_every": 100}}
    write_spec(tmp_path, name="r", base=base, sae_types=["relu"],
               grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3], "dict_size_ratio": [4.0], "sparsity_coeff": [0.1]}},
               execution={"pack_size": 3, "checkpoint_every_s": 0.2, "heartbeat_s": 0.3, "lease_s": 2})
    ckpt_dir = tmp_path / "runs" / "r" / "checkpoints"
    journal = tmp_path / "runs" / "r" / "sweep.journal"
    steps_at_stop: dict[str, int] = {}
    for sig, devices in ((signal.SIGTERM, "cpu:0,cpu:1"), (signal.SIGKILL, "cpu:0,cpu:1,cpu:2")):
        proc = subprocess.Popen([sys.executable, "-m", "saesweep", "sweep", "--devices", devices], cwd=tmp_path,
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (ckpt_dir.exists() and saved_steps(ckpt_dir)):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.3, 1.5))  # somewhere in the middle of training
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        steps_at_stop.update(saved_steps(ckpt_dir))
        if sig == signal.SIGKILL:
            time.sleep(2.5)  # the dead workers' leases expire
    assert steps_at_stop, "no pack was interrupted mid-training"
    again = saesweep("sweep", "--devices", "cpu:0", cwd=tmp_path, check=True, timeout=300)
    assert "6 complete, 0 failed" in again.stdout
    store = SweepStore(str(journal), "r", create=False)
    done = complete_count_by_trial(store)
    assert len(done) == 6 and set(done.values()) == {1}  # none lost, none twice
    recs = {r.trial_id: r for r in store.records()}
    kept = {tid: recs[tid].metrics["resumed_from_step"] / step for tid, step in steps_at_stop.items()}
    print("share of the steps kept per interrupted trial:", kept)
    assert len(kept) >= 3 and all(k >= 0.9 for k in kept.values()), (steps_at_stop, kept)
    assert list(ckpt_dir.glob("*")) == []


class Killed(BaseException):
    """Stands for kill -9: nothing in the worker handles it."""


def test_a_kill_right_after_a_resume_keeps_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    """A pack of 4 is stopped after its first checkpoint; two of its trials resume in a pack of 2,
    which is killed before it writes a checkpoint of its own. Reaped, they resume again from the
    first pack's checkpoint (not from the second pack's, which was never written)."""
    import threading

    from saesweep.sweep.store import RUNNING, WRITES_ATTR
    from saesweep.training.trainer import train_pack

    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 600_000, "batch_size": 512, "log_every": 100}}
    spec = parse_spec({"name": "oom", "base": base, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                       "execution": {"pack_size": 4, "lease_s": 30, "heartbeat_s": 0.5, "checkpoint_every_s": 0.05}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    stop = threading.Event()
    real_train = train_pack

    def stop_after_first_checkpoint(*a, on_checkpoint=None, **kw):
        def written(path):
            on_checkpoint(path)
            stop.set()
        return real_train(*a, on_checkpoint=written, **kw)

    monkeypatch.setattr("saesweep.training.run.train_pack", stop_after_first_checkpoint)
    ex = spec.execution
    Worker(store, ex, stop=stop).run()
    monkeypatch.undo()
    queued = [t for t in store.trials() if t.state == t.state.WAITING]
    (first,) = {t.user_attrs["checkpoint"] for t in queued}
    ckpt_dir = tmp_path / "runs" / "oom" / "checkpoints"
    assert (ckpt_dir / first).exists()

    writes = []

    def killed(configs, **kw):
        writes.append({t.user_attrs.get(WRITES_ATTR) for t in store.trials([RUNNING])})
        raise Killed

    monkeypatch.setattr(worker_module, "run_pack", killed)
    with pytest.raises(Killed):
        Worker(store, ex, max_pack=2).run()
    assert writes == [{first}]  # a reaper would requeue them onto the checkpoint that exists
    time.sleep(0.05)
    reaped = store.reap_expired(lease_s=0.01)
    assert len(reaped) == 2
    again = {t.user_attrs["checkpoint"] for t in store.trials() if t.state == t.state.WAITING}
    assert again == {first}
