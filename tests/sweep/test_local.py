"""The multi-device scheduler (dynamic) and the device-aware runner (round_robin) on CPU slots.

Every run here starts real worker processes, one per slot of ``--devices cpu:0,cpu:1``, on a
tiny synthetic sweep; the seed's command lines are run through its script names.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sweep_helpers import REPO, complete_count_by_trial, env, saesweep, write_spec

from saesweep.config.sweep import expand, load_spec
from saesweep.sweep.display import WORKER_STATS_PREFIX, slot_of_worker
from saesweep.sweep.local import run_workers
from saesweep.sweep.planning import ASSIGNMENT_ATTR, plan_workers
from saesweep.sweep.store import SweepStore
from saesweep.sweep.worker import open_sweep, queue_trials

GRID = {"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1, 0.3]}}


def script(name: str, *args, cwd: Path, extra_env=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=cwd,
                       env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{name} {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def check_once(store: SweepStore, n: int) -> dict[str, str]:
    """Every trial COMPLETE exactly once, never started twice; returns trial id -> slot that ran it."""
    done = complete_count_by_trial(store)
    assert len(done) == n and set(done.values()) == {1}
    started = Counter(t.user_attrs["trial_id"] for t in store.trials() if t.state != t.state.WAITING)
    assert set(started.values()) == {1}, "a trial was started twice"
    slots = {}
    for r in store.records():
        assert r.state == "complete" and (Path(r.run_dir) / "metrics.json").exists()
        slots[r.trial_id] = slot_of_worker(r.worker)
    return slots


@pytest.mark.parametrize("policy, source", [("dynamic", "grid"), ("round_robin", "config_dir")])
def test_policies_run_every_trial_once_on_two_cpu_slots(tmp_path, policy, source):
    write_spec(tmp_path, name="s", sae_types=["relu"], grids=GRID, execution={"pack_size": 1, "progress_every_s": 0.5})
    if source == "config_dir":  # approach 1's folder of configs, run by the device-aware runner
        saesweep("generate", "--output_dir", "sweep_configs", cwd=tmp_path, check=True)
        out = script("run_device_aware_sweep.py", "--config_dir", "sweep_configs", "--devices", "cpu:0,cpu:1", cwd=tmp_path)
        name = "sweep_configs"
    else:  # in-memory grid, by the multi-device scheduler
        out = script("run_multi_device_sweep.py", "--sae_types", "relu", "--devices", "cpu:0,cpu:1", cwd=tmp_path)
        name = "s"
    text = out.stdout
    assert "Found CPU device (" in text and "Using devices: ['cpu:0', 'cpu:1']" in text
    assert f"(policy {policy})" in text and "8 complete, 0 failed" in text
    assert re.search(r"^\[\s*\d+s\] \d/8 complete, \d running, 0 failed  \|  cpu:", text, re.M)  # live progress
    table = text[text.index("Per-device performance:"):]
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(cpu:\d)\s+(\d+)\s+0\s+\d+\s+[\d,]+\s+\d+%", table, re.M)}
    assert set(rows) == {"cpu:0", "cpu:1"} and sum(rows.values()) == 8

    store = SweepStore(str(tmp_path / "runs" / name / "sweep.journal"), name, create=False)
    ran_on = check_once(store, 8)
    assert set(ran_on.values()) <= {"cpu:0", "cpu:1"}  # (dynamic: a worker that starts late may find nothing left)
    assert Counter(ran_on.values()) == +Counter(rows)  # the table counts what the store recorded
    stats = [v for k, v in store.info.items() if k.startswith(WORKER_STATS_PREFIX)]  # stored with the sweep
    assert sorted(s["slot"] for s in stats) == ["cpu:0", "cpu:1"]
    assert all(s["busy_fraction"] > 0 and s["tokens_per_s"] > 0 for s in stats if s["trials_done"])
    if policy == "round_robin":
        assert "Experiment distribution:\n  cpu:0: 4 experiments\n  cpu:1: 4 experiments" in text
        assert ran_on == store.info[ASSIGNMENT_ATTR]  # each device ran exactly the trials dealt to it

    status = saesweep("status", name, cwd=tmp_path, check=True).stdout
    assert "Per-device performance:" in status
    for slot, n in rows.items():
        assert re.search(rf"^\s+{slot}\s+{n}\s+0\s", status, re.M), status


def run_sweep(tmp_path, name, policy, monkeypatch):
    spec = load_spec(write_spec(tmp_path, name=name, sae_types=["relu"], output_dir=str(tmp_path / "runs"),
                                grids={"relu": {**GRID["relu"], "sparsity_coeff": [0.1, 0.2, 0.3]}},
                                execution={"pack_size": 1, "policy": policy}))
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    t0 = time.perf_counter()
    outcome = run_workers(store, spec.execution, plan_workers("cpu:0,cpu:1"), policy=policy, show_progress=False,
                          echo=lambda *a: None)
    wall = time.perf_counter() - t0
    assert outcome.exit_code == 0
    ran_on = check_once(store, 12)
    return Counter(ran_on.values()), wall, {w["slot"]: w for w in outcome.workers}


def test_dynamic_balances_a_slow_slot_and_round_robin_keeps_its_split(tmp_path, monkeypatch):
    """cpu:1 made slow (1.5 s more per trial, through the documented debug knob): the dynamic
    queue gives cpu:0 most of the work; round-robin keeps 6/6 and waits for cpu:1."""
    monkeypatch.setenv("SAESWEEP_SLOW_SLOTS", "cpu:1=1.5")
    dyn, dyn_wall, dyn_stats = run_sweep(tmp_path, "dyn", "dynamic", monkeypatch)
    rr, rr_wall, rr_stats = run_sweep(tmp_path, "rr", "round_robin", monkeypatch)
    print(f"\ndynamic: {dict(dyn)} in {dyn_wall:.1f}s; round_robin: {dict(rr)} in {rr_wall:.1f}s")
    assert dyn["cpu:0"] >= dyn["cpu:1"] + 4, dyn
    assert rr == {"cpu:0": 6, "cpu:1": 6}
    assert rr_stats["cpu:1"]["busy_s"] >= 9.0  # the slow slot's six trials
    assert dyn_stats["cpu:1"]["trials_done"] == dyn["cpu:1"] and rr_stats["cpu:0"]["trials_done"] == 6
