"""The sweep store on real databases: exactly-once claims, leases, retries, crash and resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg import postgres_server, postgres_url  # noqa: F401  (fixtures)
from sweep_helpers import (
    TINY_BASE,
    complete_count_by_trial,
    saesweep,
    start_worker,
    write_spec,
)

from saesweep.config.experiment import ConfigError
from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.store import SweepStore
from saesweep.sweep.urls import redact
from saesweep.sweep.worker import open_sweep, queue_trials


def tiny_spec(tmp_path, storage=None, **fields):
    grids = fields.pop("grids", {"relu": {"lr": [1e-3, 3e-3, 1e-2], "dict_size_ratio": [2.0, 4.0], "sparsity_coeff": [0.1, 0.3]}})
    data = {"name": "t", "base": TINY_BASE, "sae_types": list(grids), "grids": grids, "output_dir": str(tmp_path / "runs"),
            "execution": {"pack_size": 1, "lease_s": 30, "heartbeat_s": 0.5, **fields.pop("execution", {})}, **fields}
    if storage:
        data["storage"] = storage
    return parse_spec(data)


def attempts_by_trial(store: SweepStore) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in store.trials():
        if t.state != t.state.WAITING:
            out[t.user_attrs["trial_id"]] = out.get(t.user_attrs["trial_id"], 0) + 1
    return out


def run_many_workers(spec, n: int, cwd: Path) -> None:
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    procs = [start_worker(spec.storage_url, spec.name, cwd) for _ in range(n)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [(p.returncode, o[-1500:]) for p, o in zip(procs, outs)]


def check_exactly_once(spec, expected: int) -> SweepStore:
    store = SweepStore(spec.storage_url, spec.name, create=False)
    done = complete_count_by_trial(store)
    assert len(done) == expected and set(done.values()) == {1}
    assert set(attempts_by_trial(store).values()) == {1}, "a trial was started twice"
    for r in store.records():
        assert r.state == "complete" and (Path(r.run_dir) / "metrics.json").exists()
    return store


def test_eight_workers_journal_each_trial_runs_once(tmp_path):
    spec = tiny_spec(tmp_path, grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 5e-3], "dict_size_ratio": [2.0, 4.0],
                                               "sparsity_coeff": [0.01, 0.1, 0.3]}})
    run_many_workers(spec, 8, tmp_path)
    check_exactly_once(spec, 24)


@pytest.mark.postgres
def test_eight_workers_postgres_each_trial_runs_once(tmp_path, postgres_url):
    spec = tiny_spec(tmp_path, storage=postgres_url, grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 5e-3],
                     "dict_size_ratio": [2.0, 4.0], "sparsity_coeff": [0.01, 0.1, 0.3]}})
    run_many_workers(spec, 8, tmp_path)
    check_exactly_once(spec, 24)


def test_queueing_is_idempotent(tmp_path):
    spec = tiny_spec(tmp_path)
    store = open_sweep(spec)
    assert queue_trials(store, spec, expand(spec)) == 12
    assert queue_trials(store, spec, expand(spec)) == 0
    assert store.counts()["waiting"] == 12


def test_sigkill_mid_trial_then_resume(tmp_path):
    """kill -9 a sweep mid-trial; running it again completes every trial exactly once, the
    finished ones untouched, and the killed pack resumes from its checkpoint."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 600_000, "batch_size": 512, "log_every": 100}}
    spec_path = write_spec(tmp_path, name="k", base=base, sae_types=["relu"],
                           grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [4.0], "sparsity_coeff": [0.1]}},
                           execution={"pack_size": 1, "lease_s": 2, "heartbeat_s": 0.3, "checkpoint_every_s": 0.3})
    proc = subprocess.Popen([sys.executable, "-m", "saesweep", "sweep", "--spec", str(spec_path)], cwd=tmp_path,
                            env=__import__("sweep_helpers").env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "runs" / "k" / "sweep.journal"
    deadline = time.time() + 240
    store = None
    while time.time() < deadline:
        time.sleep(0.3)
        if not journal.exists():
            continue
        store = store or SweepStore(str(journal), "k", create=False)
        c = store.counts()
        ckpts = list((tmp_path / "runs" / "k" / "checkpoints").glob("*.safetensors"))
        if c["complete"] >= 1 and c["running"] == 1 and ckpts:
            break
    else:
        proc.kill()
        pytest.fail("the sweep never reached a finished trial with another one running")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r.trial_id: (r.number, (Path(r.run_dir) / "metrics.json").stat().st_mtime_ns)
              for r in store.records() if r.state == "complete"}
    killed = [r.trial_id for r in store.records() if r.state == "running"]
    time.sleep(2.5)  # let the dead worker's lease expire
    out = saesweep("sweep", "--spec", spec_path, cwd=tmp_path, check=True)
    assert "4 complete" in out.stdout
    store = SweepStore(str(journal), "k", create=False)
    assert set(complete_count_by_trial(store).values()) == {1} and len(complete_count_by_trial(store)) == 4
    after = {r.trial_id: r for r in store.records()}
    for tid, (number, mtime) in before.items():  # finished trials untouched
        assert after[tid].number == number
        assert (Path(after[tid].run_dir) / "metrics.json").stat().st_mtime_ns == mtime
    assert attempts_by_trial(store)[killed[0]] == 2
    assert "lease expired" in " ".join(str(t.user_attrs.get("reason")) for t in store.trials())
    assert after[killed[0]].metrics["resumed_from_step"] > 0


def test_a_grid_value_no_config_can_take_is_refused_before_anything_runs(tmp_path):
    # dict_size_ratio 1.03 x d_in 8 is not a whole number of features
    with pytest.raises(ConfigError, match="dict_size_ratio: 1.03 times d_in 8"):
        tiny_spec(tmp_path, grids={"relu": {"lr": [1e-3], "dict_size_ratio": [2.0, 1.03], "sparsity_coeff": [0.1]}})
    assert not (tmp_path / "runs").exists()


def test_failing_and_nan_trials_are_isolated(tmp_path, monkeypatch):
    # trials of dict_size_ratio 4 raise (an error inside training); lr 1e30 diverges; the
    # others complete; the diverged member's pack leaves no checkpoint behind.
    from saesweep.training import trainer

    real = trainer.build_sae

    def build(configs, d_in, device):
        if configs[0].dict_size_ratio == 4.0:
            raise RuntimeError("broken on purpose")
        return real(configs, d_in, device)

    monkeypatch.setattr(trainer, "build_sae", build)
    spec = tiny_spec(tmp_path, grids={"relu": {"lr": [1e-3, 1e30, 3e-3], "dict_size_ratio": [2.0, 4.0], "sparsity_coeff": [0.1]}},
                     execution={"pack_size": 4, "max_retries": 1, "checkpoint_every_s": 0.001},
                     base={**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 16384, "batch_size": 256}})
    from saesweep.sweep.local import run_workers
    from saesweep.sweep.planning import plan_workers

    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    outcome = run_workers(store, spec.execution, plan_workers("cpu", None), show_progress=False)
    recs = {(r.params["lr"], r.params["dict_size_ratio"]): r for r in store.records()}
    assert outcome.exit_code == 1
    assert recs[(1e-3, 2.0)].state == recs[(3e-3, 2.0)].state == "complete"
    nan = recs[(1e30, 2.0)]
    assert nan.state == "failed" and "diverged" in nan.reason and nan.attempts == 1  # not retried
    for lr in (1e-3, 1e30, 3e-3):
        r = recs[(lr, 4.0)]
        assert r.state == "failed" and "broken on purpose" in r.reason and r.attempts == 2  # retried once
    assert list((spec.sweep_dir / "checkpoints").glob("*")) == []


def test_consecutive_failures_stop_the_sweep(tmp_path, monkeypatch):
    from saesweep.training import trainer

    def broken(configs, d_in, device):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(trainer, "build_sae", broken)
    spec = tiny_spec(tmp_path, grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                     execution={"max_retries": 0, "max_consecutive_failures": 2})
    from saesweep.sweep.local import run_workers
    from saesweep.sweep.planning import plan_workers

    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    outcome = run_workers(store, spec.execution, plan_workers("cpu", None), show_progress=False)
    assert outcome.aborted and "2 trials failed in a row" in outcome.aborted
    assert store.counts()["waiting"] == 2 and outcome.exit_code == 1


def test_expired_lease_is_reaped_once_and_zombie_result_discarded(tmp_path):
    spec = tiny_spec(tmp_path)
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec)[:1])
    claim = store.claim("zombie")[0]
    other = SweepStore(spec.storage_url, spec.name, create=False)
    time.sleep(0.05)
    assert other.reap_expired(lease_s=0.01) == [claim.trial_id]
    assert other.reap_expired(lease_s=0.01) == []  # already reaped: nothing happens twice
    assert store.complete(claim, {"fvu": 0.1}, objectives=["fvu"]) is False  # the zombie's late result
    assert store.counts() == {"waiting": 1, "running": 0, "complete": 0, "failed": 0, "pruned": 0}


def test_bad_storage_urls():
    with pytest.raises(ConfigError, match="unknown scheme"):
        SweepStore("mysql://u:p@h/db", "x")
    with pytest.raises(ConfigError) as e:
        SweepStore("postgresql://user:hunter2@127.0.0.1:1/db", "x")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    assert redact("postgresql://a:b@h:5/d") == "postgresql://a:***@h:5/d"


def test_journal_grows_with_trials_not_with_training_time(tmp_path):
    """A journal worker holds a liveness lock instead of writing heartbeats: one lease record
    per claim, however long the trials train (the old way wrote one per trial per beat)."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 200_000, "batch_size": 512, "log_every": 100}}
    spec = tiny_spec(tmp_path, grids={"relu": {"lr": [1e-3, 2e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                     base=base, execution={"pack_size": 1, "heartbeat_s": 0.01})
    from saesweep.sweep.local import run_workers
    from saesweep.sweep.planning import plan_workers

    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    t0 = time.time()
    run_workers(store, spec.execution, plan_workers("cpu", None), show_progress=False)
    beats = Path(spec.storage_url).read_text().count("saesweep:heartbeat")
    assert time.time() - t0 > 0.2  # long enough for many beats the old way
    assert beats <= 2, beats  # one per claim
    assert not any(Path(f"{spec.storage_url}.leases").glob("*"))  # the worker let its lock go
