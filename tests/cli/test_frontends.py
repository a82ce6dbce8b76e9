"""The seed's command lines for approaches 1-3 and the sweep CLI's handling of bad input.

Each test runs in a fresh folder holding a ``saesweep.yaml`` with a tiny base config (the
spec file every command picks up), so the seed's grids run in seconds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sweep_helpers import REPO, complete_count_by_trial, env, saesweep, write_spec

from saesweep.sweep.store import SweepStore

SEED_COUNTS = {"relu": 48, "hard_concrete": 288, "gated": 144, "gated_hard_concrete": 432}


def script(name: str, *args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    path = REPO / "scripts" / name
    cmd = ["bash", str(path)] if name.endswith(".sh") else ["python", str(path)]
    import sys

    if cmd[0] == "python":
        cmd[0] = sys.executable
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def here(tmp_path):
    write_spec(tmp_path)
    return tmp_path


def test_grid_shows_the_seed_counts(here):
    out = saesweep("grid", cwd=here, check=True).stdout
    for t, n in SEED_COUNTS.items():
        assert f"{t}: " in out and f"= {n} experiments" in out
    assert "Grand total: 912 experiments" in out


@pytest.mark.parametrize("sae_type, n", SEED_COUNTS.items())
def test_dry_run_counts_per_type(here, sae_type, n):
    out = script("run_dynamic_sweep.py", "--sae_types", sae_type, "--dry_run", cwd=here)
    assert out.returncode == 0, out.stderr
    assert f"Would run {n} experiments" in out.stdout
    assert not (here / "runs").exists()  # a dry run touches nothing


def test_approach_1_generate_then_run(here):
    out = script("generate_sweep_configs.py", "--output_dir", "sweep_configs", cwd=here)
    assert out.returncode == 0, out.stderr
    files = list((here / "sweep_configs").glob("*.yaml"))
    assert len(files) == 912
    text = files[0].read_text()
    assert text.startswith("# saesweep experiment") and "sae_type:" in text

    dry = script("run_sweep.py", "--config_dir", "sweep_configs", "--dry_run", cwd=here)
    assert dry.returncode == 0 and "Would run 912 experiments" in dry.stdout
    dry = script("run_sweep.py", "--config_dir", "sweep_configs", "--filter", "relu", "--dry_run", cwd=here)
    assert "Would run 48 experiments (relu: 48)" in dry.stdout
    assert not (here / "runs").exists()

    run = script("run_sweep.py", "--config_dir", "sweep_configs", "--filter", "relu", "--max_parallel", "2", cwd=here)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "48 complete, 0 failed" in run.stdout
    store = SweepStore(str(here / "runs" / "sweep_configs" / "sweep.journal"), "sweep_configs", create=False)
    assert set(complete_count_by_trial(store).values()) == {1} and len(complete_count_by_trial(store)) == 48
    # resuming runs nothing again
    again = script("run_sweep.py", "--config_dir", "sweep_configs", "--filter", "relu", cwd=here)
    assert again.returncode == 0 and "0 new, 48 already complete" in again.stdout
    assert len(SweepStore(str(here / "runs" / "sweep_configs" / "sweep.journal"), "sweep_configs", create=False).trials()) == 48


def test_approach_2_bash_script(here):
    out = script("run_simple_sweep.sh", "relu", "1", cwd=here)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "48 complete, 0 failed" in out.stdout
    bad = script("run_simple_sweep.sh", "relu", "zero", cwd=here)
    assert bad.returncode == 2 and "PARALLEL_JOBS" in bad.stderr


def test_approach_3_dynamic_runner(here):
    dry = script("run_dynamic_sweep.py", "--sae_types", "relu", "--limit", "5", "--dry_run", cwd=here)
    assert "Would run 5 experiments" in dry.stdout and "relu-" in dry.stdout
    dry = script("run_dynamic_sweep.py", "--sae_types", "relu", "--limit", "3", "--dry_run", cwd=here)
    assert "Would run 3 experiments" in dry.stdout
    run = script("run_dynamic_sweep.py", "--sae_types", "relu", "--limit", "3", cwd=here)
    assert run.returncode == 0, run.stderr
    assert "3 complete, 0 failed" in run.stdout
    trials = list((here / "runs" / "seed" / "trials").iterdir())
    assert len(trials) == 3 and all((t / "metrics.json").exists() for t in trials)
    # no config files written: only results
    assert {p.name for p in (here / "runs" / "seed").iterdir()} <= {"trials", "sweep.journal", "checkpoints", "sweep.journal.saesweep-lock",
                                                                  "sweep.journal.saesweep-claims-lock"}
    # status and results
    status = saesweep("status", "seed", cwd=here, check=True).stdout
    assert "relu" in status and "3" in status
    res = saesweep("results", "seed", cwd=here, check=True)
    import pandas as pd

    df = pd.read_parquet(here / "runs" / "seed" / "results.parquet")
    assert len(df) == 3 and {"lr", "dict_size_ratio", "sparsity_coeff", "fvu", "l0", "state"} <= set(df.columns)
    assert (df["state"] == "complete").all()
    assert (here / "runs" / "seed" / "results.csv").exists() and "3 trials" in res.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sweep", "--sae_types", "relu,top_k"], "top_k"),
        (["sweep", "--max_parallel", "0"], "--max_parallel"),
        (["sweep", "--limit", "-3"], "--limit"),
        (["sweep", "--storage", "mysql://u:pw@h/db"], "unknown scheme"),
        (["sweep", "--storage", "postgresql://u:pw@127.0.0.1:1/db", "--limit", "1"], "cannot connect"),
        (["sweep", "--devices", "tpu:0"], "--devices"),
        (["sweep", "--set", "train.tokens=-5"], "train.tokens"),
        (["run", "--config_dir", "nowhere"], "--config_dir"),
        (["status", "nosuchsweep"], "nosuchsweep"),
        (["sweep", "--policy", "random"], "--policy"),
        (["sweep", "--storage", "sqlite:///s.db", "--devices", "cpu:0,cpu:1"], "SQLite"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(here, args, needle):
    out = saesweep(*args, cwd=here)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("saesweep: warning: the password")]
    assert needle in out.stderr and len(errors) == 1, out.stderr
    assert not (here / "runs").exists()
    assert "pw" not in out.stderr.replace("pw@", "") or "***" in out.stderr


@pytest.mark.parametrize(
    "spec_text, needle",
    [
        ("grids:\n  relu: {}\n", "grids.relu is empty"),
        ("grids:\n  relu:\n    lr: []\n", "grids.relu.lr"),
        ("sae_types: [relu]\ngrids:\n  relu:\n    lr: [0.001\n", "malformed YAML"),
        ("sae_types: []\n", "sae_types"),
        ("base:\n  lr: -1\n", "lr"),
        ("base:\n  source: {kind: hf, hook: blocks.x.attn}\n", "source.hook"),
        ("search: {method: annealing}\n", "search.method"),
        ("colour: red\n", "colour"),
    ],
)
def test_bad_specs_exit_2(tmp_path, spec_text, needle):
    (tmp_path / "saesweep.yaml").write_text(spec_text)
    out = saesweep("sweep", "--dry_run", cwd=tmp_path)
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_bad_config_file_stops_run_before_anything_starts(here):
    saesweep("generate", "--output_dir", "cfgs", "--sae_types", "relu", "--limit", "3", cwd=here, check=True)
    bad = sorted((here / "cfgs").glob("*.yaml"))[1]
    bad.write_text(bad.read_text().replace("sparsity_coeff:", "aux_coeff: 0.1\nsparsity_coeff:"))
    out = saesweep("run", "--config_dir", "cfgs", cwd=here)
    assert out.returncode == 2 and bad.name in out.stderr and "aux_coeff" in out.stderr
    assert not (here / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, args, complete",
    [
        ("run_simple_sweep.sh", ["hard_concrete", "4"], 288),
        ("run_simple_sweep.sh", ["gated", "2"], 144),
        ("run_dynamic_sweep.py", ["--sae_types", "relu,hard_concrete", "--max_parallel", "2"], 336),
        ("run_dynamic_sweep.py", ["--max_parallel", "1"], 912),
    ],
)
def test_seed_command_lines_in_full(here, name, args, complete):
    out = script(name, *args, cwd=here, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{complete} complete, 0 failed" in out.stdout


@pytest.mark.slow
def test_seed_generate_then_run_everything(here):
    assert script("generate_sweep_configs.py", "--output_dir", "sweep_configs", cwd=here).returncode == 0
    out = script("run_sweep.py", "--config_dir", "sweep_configs", cwd=here, timeout=3600)
    assert out.returncode == 0 and "912 complete, 0 failed" in out.stdout
    out = script("run_sweep.py", "--config_dir", "sweep_configs", "--max_parallel", "2", cwd=here, timeout=3600)
    assert out.returncode == 0 and "912 already complete" in out.stdout


def test_seed_scripts_work_from_a_python_without_saesweep(here):
    """The seed's `python scripts/...` lines from a plain shell: a Python that cannot import
    saesweep (here the base interpreter without site-packages) re-runs the script with the
    project's .venv, and says so."""
    import sys

    base = getattr(sys, "_base_executable", None)
    if not (REPO / ".venv" / "bin" / "python").exists() or not base:
        pytest.skip("needs the project's .venv (bash scripts/setup.sh)")
    out = subprocess.run([base, "-S", str(REPO / "scripts" / "run_dynamic_sweep.py"), "--sae_types", "relu",
                          "--limit", "2", "--dry_run"], cwd=here, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "re-running with" in out.stderr and ".venv/bin/python" in out.stderr
    assert "Would run 2 experiments" in out.stdout


def test_done_line_counts_the_selected_types_only(here):
    saesweep("sweep", "--sae_types", "relu", "--limit", "1", cwd=here, check=True)
    out = saesweep("sweep", "--sae_types", "gated", "--limit", "1", cwd=here, check=True).stdout
    done = next(line for line in out.splitlines() if line.startswith("Done in"))
    assert "1 complete, 0 failed, 0 waiting, 0 running" in done, done


def test_a_sweep_over_the_modern_types_from_the_seed_script(tmp_path):
    """`run_dynamic_sweep.py --sae_types topk,jumprelu`: 2-member packs of each train and record."""
    write_spec(tmp_path, grids={"topk": {"lr": [1e-3, 3e-3], "k": [4]},
                                "jumprelu": {"lr": [1e-3, 3e-3], "sparsity_coeff": [0.1]}})
    run = script("run_dynamic_sweep.py", "--sae_types", "topk,jumprelu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "4 complete, 0 failed" in run.stdout
    store = SweepStore(str(tmp_path / "runs" / "seed" / "sweep.journal"), "seed", create=False)
    types = sorted(r.sae_type for r in store.records() if r.state == "complete")
    assert types == ["jumprelu", "jumprelu", "topk", "topk"]
