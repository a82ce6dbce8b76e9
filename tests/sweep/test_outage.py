"""A database outage costs no training: leases are not reaped while workers could not heartbeat,
and a trial trained and saved by a worker that could not record it is recorded, not retrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from sweep_helpers import REPO, TINY_BASE, lr_sweep

from saesweep.config.sweep import expand
from saesweep.sweep.store import LEASE_ATTR, OUTAGE_ATTR, RETRY_MAX_WAIT_S, SweepStore
from saesweep.sweep.worker import Worker, queue_trials
from saesweep.training.run import COMPLETE_FILE, METRICS_FILE, finished_result, run_pack


def spec_of(folder, n=2):
    return lr_sweep(folder, "out", n, pack_size=4)


def test_no_lease_is_reaped_within_a_lease_of_the_end_of_an_outage(tmp_path):
    spec = spec_of(tmp_path)
    store = SweepStore(spec.storage_url, spec.name)
    queue_trials(store, spec, expand(spec))
    claims = store.claim("w", max_members=4)
    for c in claims:  # last heartbeat 100 s ago: the database was away, nobody could beat
        store.storage.set_trial_system_attr(c.trial_pk, LEASE_ATTR, {"t": store.now() - 100, "worker": "w"})
    store.note_outage_end()
    assert store.reap_expired(lease_s=30) == []
    assert store.counts()["running"] == 2
    store.set_info(**{OUTAGE_ATTR: store.now() - 31 - RETRY_MAX_WAIT_S})  # a lease (and a retry wait) since
    assert sorted(store.reap_expired(lease_s=30)) == sorted(c.trial_id for c in claims)


def test_a_trial_saved_but_not_recorded_is_recorded_from_its_run_folder(tmp_path, capsys):
    spec = spec_of(tmp_path)
    configs = expand(spec)
    results = run_pack(configs)  # trained and saved by a worker that then lost the database
    assert all(r.ok for r in results)
    assert finished_result(configs[0]) == results[0].metrics
    store = SweepStore(spec.storage_url, spec.name)
    queue_trials(store, spec, configs)
    logs = {c.trial_id: (c.run_dir / "train_log.jsonl").stat().st_mtime_ns for c in configs}

    stats = Worker(store, spec.execution).run()
    assert stats.trials_done == 2 and stats.packs == 0  # recorded, nothing trained
    assert {c.trial_id: (c.run_dir / "train_log.jsonl").stat().st_mtime_ns for c in configs} == logs
    recs = {r.trial_id: r for r in store.records()}
    assert {r.state for r in recs.values()} == {"complete"}
    assert recs[configs[0].trial_id].metrics["fvu"] == results[0].metrics["fvu"]
    assert "recorded from" in capsys.readouterr().err


def test_a_result_without_its_completion_marker_or_with_another_metrics_file_is_trained_again(tmp_path):
    spec = spec_of(tmp_path, n=1)
    (cfg,) = expand(spec)
    run_pack([cfg])
    (cfg.run_dir / COMPLETE_FILE).unlink()
    assert finished_result(cfg) is None
    run_pack([cfg])
    record = json.loads((cfg.run_dir / METRICS_FILE).read_text())
    record["metrics"]["fvu"] = 0.0  # metrics.json changed after the marker was written
    (cfg.run_dir / METRICS_FILE).write_text(json.dumps(record))
    assert finished_result(cfg) is None
    store = SweepStore(spec.storage_url, spec.name)
    queue_trials(store, spec, [cfg])
    assert Worker(store, spec.execution).run().packs == 1


@pytest.mark.postgres
def test_workers_ride_out_a_database_restart_longer_than_the_lease(tmp_path):
    """PostgreSQL stopped for longer than the lease while four workers train, and a fifth started
    meanwhile: none exits, none is reaped when it comes back, every trial completes once, one line
    each way per worker."""
    from pg import PostgresServer

    from saesweep.config.sweep import parse_spec
    from saesweep.sweep.store import COMPLETE, FAIL
    from saesweep.sweep.worker import open_sweep

    server = PostgresServer()
    try:
        url = server.new_database()
        base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 600_000, "batch_size": 512, "log_every": 100}}
        spec = parse_spec({"name": "pgout", "storage": url, "base": base, "sae_types": ["relu"],
                           "output_dir": str(tmp_path / "runs"),
                           "grids": {"relu": {"lr": [1e-3 * (i + 1) for i in range(8)], "dict_size_ratio": [2.0],
                                              "sparsity_coeff": [0.1]}},
                           "execution": {"pack_size": 2, "lease_s": 4, "heartbeat_s": 0.5, "outage_budget_s": 120}})
        store = open_sweep(spec)
        queue_trials(store, spec, expand(spec))
        from saesweep.sweep.urls import password_to_env

        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        bare = password_to_env(url, env)
        procs = [subprocess.Popen([sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", bare, "--sweep",
                                   "pgout", "--device", "cpu", "--slot", f"cpu:{i}", "--threads", "1"],
                                  cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(4)]
        deadline = time.time() + 120
        while time.time() < deadline and store.counts()["running"] < 8:  # every worker has claimed its pack
            time.sleep(0.2)
        store.backend.storage.engine.dispose()
        server.pause()
        paused_at = time.strftime("%H:%M:%S")
        late = subprocess.Popen([sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", bare, "--sweep",
                                 "pgout", "--device", "cpu", "--slot", "cpu:4", "--threads", "1"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(10)  # well past the 4 s lease
        procs.append(late)  # a worker started while the database is down waits for it too
        gave_up = [(p.returncode, p.communicate()[1]) for p in procs if p.poll() is not None]
        assert not gave_up, [o[-3000:] for _, o in gave_up]  # nobody gave up
        server.start()
        restarted_at = time.strftime("%H:%M:%S")
        outs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0, 0], outs
        assert "database unreachable at start; waiting" in outs[-1]
        outs = outs[:-1]
        store = SweepStore(url, "pgout", create=False)
        done: dict[str, int] = {}
        for t in store.trials([COMPLETE]):
            done[t.user_attrs["trial_id"]] = done.get(t.user_attrs["trial_id"], 0) + 1
        assert len(done) == 8 and set(done.values()) == {1}
        reaped = [(t.user_attrs.get("reason"), t.datetime_complete) for t in store.trials([FAIL])
                  if "lease expired" in str(t.user_attrs.get("reason"))]
        assert not reaped, (reaped, paused_at, restarted_at)
        lost = [o.count("database unreachable") for o in outs]
        back = [o.count("reachable again") for o in outs]
        assert lost == back and set(lost) <= {0, 1} and sum(lost) >= 2, outs
        assert not any("Traceback" in o for o in outs), outs
    finally:
        server.stop()
