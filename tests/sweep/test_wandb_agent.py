"""W&B sweeps from the sweep spec: YAML per type, W&B's schema, the agent program offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("wandb")

from sweep_helpers import REPO, TINY_BASE, env, write_spec  # noqa: E402
from wandb_files import read_run_file  # noqa: E402

from saesweep.config.sweep import default_grid, load_spec, parse_spec  # noqa: E402
from saesweep.sweep.store import SweepStore  # noqa: E402
from saesweep.sweep.wandb_agent import (  # noqa: E402
    combinations,
    schema_violations,
    setup,
    sweep_config,
)

SEED_COUNTS = {"relu": 48, "hard_concrete": 288, "gated": 144, "gated_hard_concrete": 432}


def valid(config: dict) -> None:
    violations = schema_violations(config)
    if violations is None:
        pytest.skip("W&B's sweep validator is not installed (pip install sweeps jsonschema)")
    assert violations == [], violations


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))


@pytest.mark.parametrize("sae_type", list(SEED_COUNTS))
def test_seed_grid_sweep_config_matches_the_grid_and_validates(sae_type):
    spec = load_spec(None)
    cfg = sweep_config(spec, sae_type)
    assert combinations(cfg) == SEED_COUNTS[sae_type] == spec.grid_size(sae_type)
    assert cfg["method"] == "grid" and cfg["metric"] == {"name": "fvu", "goal": "minimize"}
    assert cfg["program"] == f"scripts/sweep_agent_{sae_type}.py"
    params = dict(cfg["parameters"])
    assert params.pop("sae_type") == {"value": sae_type}
    assert params == {k: {"values": v} for k, v in default_grid(sae_type).items()}
    valid(cfg)


def test_schema_file_alone_validates_too():
    """The fallback when the sweeps package cannot be imported: its schema.json with jsonschema."""
    from saesweep.sweep.wandb_agent import schema_file_violations, sweeps_schema_path

    path = sweeps_schema_path()
    if path is None or schema_file_violations({}, path) is None:
        pytest.skip("W&B's sweep schema (sweeps package) or jsonschema is not installed")
    spec = load_spec(None)
    for t in SEED_COUNTS:
        assert schema_file_violations(sweep_config(spec, t), path) == []
    broken = sweep_config(spec, "relu")
    broken["method"] = "annealing"
    assert schema_file_violations(broken, path)


def test_schema_catches_a_broken_config():
    cfg = sweep_config(load_spec(None), "relu")
    cfg["method"] = "annealing"
    cfg["parameters"]["lr"] = {"valuez": [1]}
    violations = schema_violations(cfg)
    if violations is None:
        pytest.skip("W&B's sweep validator is not installed")
    assert len(violations) >= 2


def test_ranges_become_distributions_for_random_and_bayes(tmp_path):
    spec = parse_spec({"name": "r", "base": TINY_BASE, "sae_types": ["gated"],
                       "grids": {"gated": {"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                           "aux_coeff": {"low": 0.01, "high": 0.1},
                                           "dict_size_ratio": [8.0, 16.0], "sparsity_coeff": [0.1]}},
                       "search": {"method": "tpe", "n_trials": 40, "objectives": ["explained_variance"]},
                       "tracking": {"project": "p", "entity": "me"}})
    cfg = sweep_config(spec, "gated")
    assert cfg["method"] == "bayes" and cfg["run_cap"] == 40 and cfg["entity"] == "me"
    assert cfg["metric"] == {"name": "explained_variance", "goal": "maximize"}
    assert cfg["parameters"]["lr"] == {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
    assert cfg["parameters"]["aux_coeff"] == {"distribution": "uniform", "min": 0.01, "max": 0.1}
    assert combinations(cfg) is None
    valid(cfg)
    valid(sweep_config(spec, "gated", method="random"))
    from saesweep.config.experiment import ConfigError

    with pytest.raises(ConfigError, match="range cannot be searched by a W&B grid"):
        sweep_config(spec, "gated", method="grid")


def test_seed_command_line_writes_yaml_and_agent_and_prints_the_commands(tmp_path, no_wandb_login):
    """`python scripts/setup_wandb_sweep.py --sae_type relu --project P --create_agent_script`, not logged in."""
    agents = tmp_path / "scripts"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_wandb_sweep.py"), "--sae_type", "relu",
                          "--project", "tinystories-sweeps", "--create_agent_script", "--agent_dir", str(agents)],
                         cwd=tmp_path, env={**env(), **os.environ}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load((agents / "wandb_sweep_relu.yaml").read_text())
    assert combinations(config) == 48 and config["project"] == "tinystories-sweeps"
    assert config["program"] == "scripts/sweep_agent_relu.py"
    valid(config)
    agent = agents / "sweep_agent_relu.py"
    assert agent.exists() and os.access(agent, os.X_OK)
    assert "not logged in" in out.stdout
    assert "wandb sweep -p tinystories-sweeps scripts/wandb_sweep_relu.yaml" in out.stdout
    assert "wandb agent <entity>/tinystories-sweeps/<sweep_id>" in out.stdout


def test_cli_bad_input_exits_2(tmp_path, no_wandb_login):
    from sweep_helpers import saesweep

    r = saesweep("wandb-sweep", "--sae_type", "relu", "--metric", "accuracy", "--agent_dir", tmp_path / "a", cwd=tmp_path)
    assert r.returncode == 2 and "--metric accuracy" in r.stderr
    assert not (tmp_path / "a").exists()
    r = saesweep("wandb-sweep", "--sae_type", "top_k", cwd=tmp_path)
    assert r.returncode == 2 and "--sae_type" in r.stderr


def test_creates_the_sweep_when_logged_in(tmp_path, monkeypatch):
    """With credentials, the sweep is created through wandb.sweep (the W&B server is the only stand-in)."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    created = {}

    def fake_sweep(config, project=None, entity=None):
        created.update(config=config, project=project, entity=entity)
        return "abc123"

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    lines: list[str] = []
    spec = load_spec(None, **{"tracking.project": "P", "tracking.entity": "team"})
    out = setup(spec, "gated", agent_dir=str(tmp_path), create_agent_script=True, echo=lines.append)
    assert out["sweep_id"] == "abc123" and created["project"] == "P" and created["entity"] == "team"
    assert combinations(created["config"]) == 144
    assert "  wandb agent team/P/abc123" in lines

    def down(*a, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(wandb, "sweep", down)
    lines.clear()
    out = setup(spec, "gated", agent_dir=str(tmp_path), echo=lines.append)
    assert out["sweep_id"] is None and any("Could not create the sweep" in line for line in lines)
    assert any(line.startswith("  wandb sweep -e team -p P ") for line in lines)


def agent_env(tmp_path: Path, args: dict, run_id: str) -> dict:
    """What `wandb agent` sets for the program: the run's parameters in a file, the sweep and run ids."""
    from wandb.sdk.lib import config_util

    param_path = tmp_path / "wb" / "wandb" / "sweep-fakesweep" / f"config-{run_id}.yaml"
    param_path.parent.mkdir(parents=True, exist_ok=True)
    config_util.save_config_file_from_dict(str(param_path), args)
    return {**env(), **os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
            "WANDB_SWEEP_ID": "fakesweep", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(param_path),
            "WANDB_SILENT": "true"}


def test_agent_program_runs_offline_with_an_injected_config(tmp_path, no_wandb_login):
    from sweep_helpers import saesweep
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    grids = {"relu": {"lr": [1e-3, 3e-3], "dict_size_ratio": [2.0, 4.0], "sparsity_coeff": [0.1]}}
    spec_path = write_spec(tmp_path, name="ag", sae_types=["relu"], grids=grids, tracking={"project": "agent-test"})
    saesweep("wandb-sweep", "--sae_type", "relu", "--spec", spec_path, "--create_agent_script",
             "--agent_dir", tmp_path / "scripts", cwd=tmp_path, check=True)
    agent = tmp_path / "scripts" / "sweep_agent_relu.py"
    # the parameters of one run, as the W&B agent passes them: a config file and --name=value flags
    args = {"sae_type": {"value": "relu"}, "lr": {"value": 0.003}, "dict_size_ratio": {"value": 4.0},
            "sparsity_coeff": {"value": 0.1}}
    flags = sweep_utils.create_sweep_command_args({"args": args})["args"]
    p = subprocess.run([sys.executable, str(agent), *flags], cwd=tmp_path, env=agent_env(tmp_path, args, "run1"),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    r = read_run_file(next((tmp_path / "wb" / "wandb").glob("offline-run-*-run1")))
    assert r["run_id"] == "run1"
    assert r["config"]["lr"] == 0.003 and r["config"]["dict_size_ratio"] == 4.0
    tid = r["config"]["trial_id"]
    metrics = json.loads((tmp_path / "runs" / "ag" / "trials" / tid / "metrics.json").read_text())["metrics"]
    assert r["summary"]["fvu"] == pytest.approx(metrics["fvu"]) and r["summary"]["state"] == "complete"
    assert r["config"]["experiment"]["lr"] == 0.003 and r["config"]["experiment"]["train"]["tokens"] == 2048
    assert len(r["history"]) == 2 and "train/loss" in r["history"][0]
    assert r["exit_code"] == 0
    # the run is a trial of the saesweep sweep as well: status, results and report see it
    status = saesweep("status", "runs/ag", cwd=tmp_path, check=True)
    assert "Sweep 'ag' (1 trials)" in status.stdout and "relu" in status.stdout
    [rec] = SweepStore(str(tmp_path / "runs" / "ag" / "sweep.journal"), "ag", create=False).records()
    assert rec.trial_id == tid and rec.state == "complete" and rec.metrics["fvu"] == pytest.approx(metrics["fvu"])

    # the config file alone carries the parameters (the flags are a convenience)
    args["lr"] = {"value": 0.001}
    p = subprocess.run([sys.executable, str(agent)], cwd=tmp_path, env=agent_env(tmp_path, args, "run2"),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    r2 = read_run_file(next((tmp_path / "wb" / "wandb").glob("offline-run-*-run2")))
    assert r2["config"]["lr"] == 0.001 and r2["config"]["trial_id"] != tid

    # a run for another SAE type is refused
    args["sae_type"] = {"value": "gated"}
    p = subprocess.run([sys.executable, str(agent)], cwd=tmp_path, env=agent_env(tmp_path, args, "run3"),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 2 and "trains sae_type relu" in p.stderr


def test_agent_program_help_and_ctrl_c(tmp_path, no_wandb_login, monkeypatch, capsys):
    """--help prints what the program does and exits 0 without starting a run; Ctrl-C exits 130
    with one line and no traceback."""
    from sweep_helpers import saesweep

    from saesweep.sweep import wandb_agent

    grids = {"gated": {"lr": [1e-3], "sparsity_coeff": [0.1], "aux_coeff": [1.0]}}
    spec_path = write_spec(tmp_path, name="h", sae_types=["gated"], grids=grids)
    saesweep("wandb-sweep", "--sae_type", "gated", "--spec", spec_path, "--create_agent_script",
             "--agent_dir", tmp_path / "scripts", cwd=tmp_path, check=True)
    p = subprocess.run([sys.executable, str(tmp_path / "scripts" / "sweep_agent_gated.py"), "--help"], cwd=tmp_path,
                       env=agent_env(tmp_path, {}, "help"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout and "aux_coeff" in p.stdout, p.stdout + p.stderr
    assert not list((tmp_path / "wb" / "wandb").glob("offline-run-*"))  # no run was started

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(wandb_agent, "_agent", interrupted)
    assert wandb_agent.agent_main("gated", spec_path=str(spec_path), argv=[]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "saesweep agent: interrupted"
