"""A database outage costs no training: leases are not reaped while workers could not heartbeat,
and a trial trained and saved by a worker that could not record it is recorded, not retrained."""

from __future__ import annotations

import json

from sweep_helpers import TINY_BASE

from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.store import LEASE_ATTR, OUTAGE_ATTR, SweepStore
from saesweep.sweep.worker import Worker, queue_trials
from saesweep.training.run import COMPLETE_FILE, METRICS_FILE, finished_result, run_pack


def spec_of(tmp_path, n=2):
    return parse_spec({"name": "out", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [1e-3 * (i + 1) for i in range(n)], "dict_size_ratio": [2.0],
                                          "sparsity_coeff": [0.1]}},
                       "execution": {"pack_size": 4, "lease_s": 30, "heartbeat_s": 0.5}})


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
    store.set_info(**{OUTAGE_ATTR: store.now() - 31})  # a lease's time since it came back
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
