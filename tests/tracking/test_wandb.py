"""W&B logging through the real wandb package, offline: run files written by a real sweep."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from sweep_helpers import TINY_BASE, saesweep, write_spec  # noqa: E402
from wandb_files import read_run_file  # noqa: E402

from saesweep.config.sweep import expand, parse_spec  # noqa: E402
from saesweep.sweep.worker import Worker, open_sweep, queue_trials  # noqa: E402
from saesweep.tracking import make_tracker  # noqa: E402
from saesweep.tracking.wandb import (  # noqa: E402
    WandbTracker,
    has_credentials,
    resolve_mode,
)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, writing under tmp_path, with no credentials in sight."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path / "wb"


def offline_runs(wandb_dir: Path) -> dict[str, dict]:
    """Every offline run under ``wandb_dir``, read from its .wandb file, by run name."""
    runs = {}
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        r = read_run_file(folder)
        r["folder"] = folder
        runs[r["name"]] = r
    return runs


def test_a_real_sweep_writes_one_offline_run_per_trial(tmp_path, offline):
    grids = {"relu": {"lr": [1e-3, 3e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]},
             "gated": {"lr": [3e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1], "aux_coeff": [0.1]}}
    path = write_spec(tmp_path, name="w", sae_types=list(grids), grids=grids, execution={"pack_size": 4},
                      tracking={"wandb": True, "project": "saesweep-test", "group": "g1"})
    out = saesweep("sweep", "--spec", path, cwd=tmp_path, check=True)
    assert "3 complete" in out.stdout
    runs = offline_runs(offline)
    results = {json.loads(p.read_text())["trial_id"]: json.loads(p.read_text())["metrics"]
               for p in (tmp_path / "runs" / "w" / "trials").glob("*/metrics.json")}
    assert set(runs) == set(results)  # one W&B run per trial, named by trial id
    for tid, r in runs.items():
        assert (r["folder"] / f"run-{r['run_id']}.wandb").exists()
        assert r["project"] == "saesweep-test" and r["group"] == "g1" and r["job_type"] == tid.split("-")[0]
        cfg = r["config"]
        assert cfg["trial_id"] == tid and cfg["sweep"] == "w" and cfg["sae_type"] == tid.split("-")[0]
        assert cfg["lr"] in (1e-3, 3e-3) and cfg["train"]["tokens"] == TINY_BASE["train"]["tokens"]
        # training curves: one row per log step, against the training step
        steps = [h["_step"] for h in r["history"]]
        assert steps == list(range(len(steps))) and len(steps) == 2
        assert all("train/loss" in h and "train/mse" in h and "train/l0" in h for h in r["history"])
        if tid.startswith("gated"):  # an auxiliary term, by its name
            assert all("train/gate_aux" in h for h in r["history"])
        # final metrics and where it ran, equal to saesweep's own results
        s = r["summary"]
        for k in ("fvu", "l0", "dead_fraction", "feature_f1", "tokens_per_s"):
            assert s[k] == pytest.approx(results[tid][k])
        assert s["state"] == "complete" and s["device"] == "cpu" and s["host"]
        assert Path(s["run_dir"]).name == tid and (Path(s["run_dir"]) / "metrics.json").exists()
        assert r["exit_code"] == 0


def test_mode_follows_credentials_and_wandb_mode(tmp_path, offline, monkeypatch):
    assert resolve_mode("auto") == "offline"  # WANDB_MODE wins
    monkeypatch.delenv("WANDB_MODE")
    assert not has_credentials() and resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online" and resolve_mode("disabled") == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_credentials() and resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"


def test_make_tracker_only_when_asked(tmp_path, offline, monkeypatch):
    spec = parse_spec({"name": "m", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path)})
    assert make_tracker(spec) is None
    on = parse_spec({"name": "m", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path),
                     "tracking": {"wandb": True}})
    assert isinstance(make_tracker(on), WandbTracker)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_tracker(on) is None


def test_wandb_failure_never_stops_a_sweep(tmp_path, offline, monkeypatch):
    import wandb

    calls = []

    def broken_init(*a, **kw):
        calls.append(1)
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    spec = parse_spec({"name": "b", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [1e-3, 2e-3, 3e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                       "execution": {"pack_size": 1}, "tracking": {"wandb": True}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    worker = Worker(store, spec.execution)
    assert isinstance(worker.tracker, WandbTracker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker.run()
    assert store.counts()["complete"] == 3
    assert len(calls) == 1  # tried once, then off for the rest of the worker
    assert sum("W&B logging is off" in str(w.message) for w in caught) == 1
    assert "W&B is down" in worker.tracker.broken


def test_a_restarted_trial_closes_its_earlier_run(tmp_path, offline, tiny_cfg):
    """A retry in the same process starts a new run; the unfinished one is closed as failed."""
    cfg = tiny_cfg(train={"tokens": 2048, "batch_size": 512, "log_every": 1})
    tracker = WandbTracker(None, mode="offline", project="p", wandb_dir=str(offline))
    for step in range(3):
        tracker.log(cfg, {"step": step, "tokens": 512 * (step + 1), "loss": 1.0, "mse": 0.5, "l0": 3.0})
    for step in range(2):  # attempt 2, from the start
        tracker.log(cfg, {"step": step, "tokens": 512 * (step + 1), "loss": 0.9, "mse": 0.4, "l0": 2.0})
    tracker.close()
    import wandb

    wandb.teardown()  # what the end of a worker process does: every run's file written out
    assert tracker.broken is None, tracker.broken
    runs = [read_run_file(f) for f in sorted((offline / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2
    assert sorted(len(r["history"]) for r in runs) == [2, 3], [(r["history"], r["summary"]) for r in runs]
    assert {r["summary"].get("state") for r in runs} == {"restarted", "interrupted"}
    assert all(r["exit_code"] == 1 for r in runs)
