"""What a new user meets in the first hour: a missing module refused before training, training
never lost to a failing evaluation, one count of trials everywhere, baselines that are not
recomputed, progress lines in a log file, a pick per type, and `train` under the memory plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sweep_helpers import env, lr_sweep, saesweep, write_spec

from saesweep.config.experiment import ConfigError
from saesweep.sweep.store import SweepStore, TrialRecord, count_line, failure_line, tally


def _no_scipy(folder: Path) -> dict:
    """An environment in which ``import scipy`` fails, as in an install without it."""
    fake = folder / "no_scipy"
    (fake / "scipy").mkdir(parents=True, exist_ok=True)
    (fake / "scipy" / "__init__.py").write_text("raise ImportError('No module named scipy (test)')\n")
    e = env()
    e["PYTHONPATH"] = str(fake) + ":" + e["PYTHONPATH"]
    return e


def test_a_missing_module_is_refused_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    path = write_spec(tmp_path, name="s", sae_types=["relu"],
                      grids={"relu": {"lr": [1e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}})
    for args in (["sweep", "--spec", str(path)], ["train", str(Path(__file__).parents[2] / "examples" / "experiment.yaml"),
                                                   "--output_dir", "out"]):
        proc = subprocess.run([sys.executable, "-m", "saesweep", *args], cwd=tmp_path, env=_no_scipy(tmp_path),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "scipy" in lines[0] and "pip install" in lines[0], proc.stderr
        assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_check_runtime_names_the_module_and_what_needs_it(monkeypatch):
    import sys

    from saesweep.config.experiment import parse_config
    from saesweep.training import preflight

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails
    monkeypatch.setattr(preflight, "_checked", set())
    with pytest.raises(ConfigError, match=r"recovery metrics of a synthetic source \(Hungarian matching\) needs the Python module scipy"):
        preflight.check_runtime([parse_config({"sae_type": "relu"})])


def test_a_failing_evaluation_keeps_the_weights_and_a_rerun_only_evaluates(tmp_path, monkeypatch):
    from saesweep.sweep.execute import plan_sweep, run_sweep
    from saesweep.training import run as run_module

    spec = lr_sweep(tmp_path, "ev", 2, pack_size=2)
    real = run_module.evaluate

    def broken(*a, **k):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(run_module, "evaluate", broken)
    first = run_sweep(spec, _configs(spec), plan_sweep(spec, _configs(spec)))
    assert first.counts["failed"] == 2 and first.counts["complete"] == 0
    assert all("evaluation failed: RuntimeError: evaluation broke" in r.reason for r in first.records)
    assert failure_line(first.records).startswith("no trial completed: 2 of 2 failed with: evaluation failed")
    runs = sorted((tmp_path / "runs" / "ev" / "trials").iterdir())
    assert len(runs) == 2 and all((r / "sae_weights.safetensors").exists() and not (r / "metrics.json").exists()
                                  for r in runs)
    logs = {r.name: (r / "train_log.jsonl").read_text() for r in runs}

    monkeypatch.setattr(run_module, "evaluate", real)
    again = run_sweep(spec, _configs(spec), plan_sweep(spec, _configs(spec)))
    assert sorted(again.reevaluated) == sorted(r.name for r in runs)
    assert again.counts["complete"] == 2 and again.counts["failed"] == 0
    steps = _configs(spec)[0].train.steps
    for r in runs:
        m = json.loads((r / "metrics.json").read_text())["metrics"]
        assert m["resumed_from_step"] == steps  # nothing trained again
        assert (r / "train_log.jsonl").read_text() == logs[r.name]
    assert not list((tmp_path / "runs" / "ev" / "checkpoints").glob("*.safetensors"))  # done: nothing kept


def _configs(spec):
    from saesweep.config.sweep import expand

    return expand(spec)


def _rec(tid, state, attempts=1, last_failure=None):
    return TrialRecord(tid, "relu", state, attempts, {}, last_failure=last_failure)


def test_one_count_of_trials():
    recs = [_rec("a", "complete", 2, "boom"), _rec("b", "waiting", 1, "boom"), _rec("c", "failed", 3, "boom"),
            _rec("d", "waiting", 0)]
    c = tally(recs)
    assert c == {"complete": 1, "failed": 1, "waiting": 2, "running": 0, "pruned": 0, "retrying": 1}
    assert count_line(c) == "1 complete, 1 failed, 2 waiting (1 after a failed attempt), 0 running"
    assert failure_line(recs) is None  # one completed
    down = [_rec("x", "waiting", 1, "No module named 'scipy'"), _rec("y", "failed", 3, "No module named 'scipy'"),
            _rec("z", "failed", 3, "other")]
    assert failure_line(down) == "no trial completed: 2 of 3 failed with: No module named 'scipy'"


def test_baselines_are_written_as_they_finish_and_never_recomputed(tmp_path):
    from saesweep.metrics.baselines import FILE, for_sweep
    from saesweep.sweep.execute import plan_sweep, run_sweep

    spec = lr_sweep(tmp_path, "bl", 2, pack_size=2)
    recs = run_sweep(spec, _configs(spec), plan_sweep(spec, _configs(spec))).records
    folder = tmp_path / "runs" / "bl"
    said: list[str] = []
    rows = for_sweep(recs, folder, [2.0, 4.0], ["pca", "random_firing"], progress=said.append)
    assert len(rows) == 4 and len(json.loads((folder / FILE).read_text())["rows"]) == 4
    assert said[0].startswith("Baselines at L0 2, 4") and sum("] pca at L0" in s for s in said) == 2
    again: list[str] = []
    assert for_sweep(recs, folder, [2.0, 4.0], ["pca", "random_firing"], progress=again.append) == rows
    assert again == []  # nothing computed, nothing said
    more: list[str] = []
    rows3 = for_sweep(recs, folder, [2.0, 4.0, 8.0], ["pca", "random_firing"], progress=more.append)
    assert len(rows3) == 6 and sum(s.startswith("  [") for s in more) == 2  # only the new L0


def test_progress_lines_when_the_output_is_a_log_file(tmp_path):
    grids = {"relu": {"lr": [1e-3, 2e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}}
    path = write_spec(tmp_path, name="p", sae_types=["relu"], grids=grids,
                      base={"source": {"kind": "synthetic", "d_in": 8, "n_features": 16, "sparsity": 0.1},
                            "train": {"tokens": 400_000, "batch_size": 256, "log_every": 10, "dtype": "float32"},
                            "eval": {"tokens": 512}},
                      execution={"pack_size": 1, "progress_every_s": 0.5})
    out = saesweep("sweep", "--spec", path, cwd=tmp_path, check=True)  # stdout is a pipe
    import re

    lines = [ln for ln in out.stdout.splitlines() if re.match(r"^\[\s*\d+s\] \d/2 complete", ln)]
    assert lines, out.stdout
    assert any("pack(s) training (1 trials)" in ln and "SAE-tok/s" in ln and "ETA" in ln for ln in lines), lines
    assert not (tmp_path / "runs" / "p" / ".progress").exists()  # workers' progress files go with them


def test_knee_of_a_frontier_by_hand():
    from saesweep.reporting.pick import knee

    # log L0 0..1 after scaling, FVU 1..0: the chord runs from (0, 1) to (1, 0); the middle point
    # (x 0.5, y 0.1) is the farthest from it
    pts = np.array([[1.0, 1.0], [10.0, 0.1], [100.0, 0.0]])
    assert knee(pts) == 1
    assert knee(np.array([[1.0, 1.0], [100.0, 0.0]])) == 1  # two points: the denser


def test_picks_leave_degenerate_saes_out_and_choose_at_an_asked_l0():
    from saesweep.reporting.pick import picks

    df = pd.DataFrame([
        {"trial_id": "r-dense", "sae_type": "relu", "state": "complete", "l0": 200.0, "fvu": 0.01, "d_in": 64, "d_sae": 512},
        {"trial_id": "r-a", "sae_type": "relu", "state": "complete", "l0": 2.0, "fvu": 0.8, "d_in": 64, "d_sae": 512},
        {"trial_id": "r-b", "sae_type": "relu", "state": "complete", "l0": 8.0, "fvu": 0.2, "d_in": 64, "d_sae": 512},
        {"trial_id": "r-c", "sae_type": "relu", "state": "complete", "l0": 30.0, "fvu": 0.1, "d_in": 64, "d_sae": 512},
        {"trial_id": "r-d", "sae_type": "relu", "state": "complete", "l0": 9.0, "fvu": 0.25, "d_in": 64, "d_sae": 512},
    ])
    rows = picks(df, "fvu", at_l0=[8.5, 100.0])
    by = {r["choice"]: r for r in rows}
    assert by["knee"]["trial_id"] == "r-b"
    assert by["L0 8.5"]["trial_id"] == "r-b"  # r-b and r-d are within 25 %; r-b has the lower FVU
    assert "no trial within 25% of L0 100" in by["L0 100"]["note"]
    assert all(r.get("trial_id") != "r-dense" for r in rows)


def test_train_uses_the_memory_plan(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "experiment.yaml"
    out = saesweep("train", example, "--set", "dict_size_ratio=100000000", "--output_dir", "out", cwd=tmp_path)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dict_size_ratio" in lines[0] and "one trial needs" in lines[0], out.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_heartbeat_must_be_well_below_the_lease():
    from saesweep.config.sweep import ExecutionSpec

    assert ExecutionSpec(lease_s=8).heartbeat_s == 2.0  # a short lease without a heartbeat: four beats per lease
    with pytest.raises(ValueError, match="heartbeat_s .60. must be at most a third of execution.lease_s .5."):
        ExecutionSpec(lease_s=5, heartbeat_s=60)


def test_status_gives_the_same_counts_as_the_end_line(tmp_path):
    grids = {"relu": {"lr": [1e-3, 2e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}}
    path = write_spec(tmp_path, name="c", sae_types=["relu"], grids=grids)
    end = saesweep("sweep", "--spec", path, cwd=tmp_path, check=True).stdout
    status = saesweep("status", "c", cwd=tmp_path, check=True).stdout
    line = "2 complete, 0 failed, 0 waiting, 0 running"
    assert line in end and line in status
    store = SweepStore(str(tmp_path / "runs" / "c" / "sweep.journal"), "c", create=False)
    assert {k: v for k, v in tally(store.records()).items() if k != "retrying"} == store.counts()
