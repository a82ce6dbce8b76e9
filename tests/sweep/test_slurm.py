"""`saesweep launch`: the Slurm job-array path, run end to end with submitit's local executor
(same pickled task, same signal handling and requeue as on Slurm), its dry run, and a task
preempted mid-trial that checkpoints, is requeued and resumes the pack from its checkpoint."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from sweep_helpers import TINY_BASE, complete_count_by_trial, saesweep, write_spec

from saesweep.cli import main
from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.slurm import LaunchOptions, parse_mem, split_password, submit
from saesweep.sweep.store import COMPLETE, FAIL, SweepStore
from saesweep.sweep.worker import open_sweep, queue_trials
from saesweep.training.run import INTERRUPTED


def tiny_spec(tmp_path, name="l", tokens=2048, lrs=(1e-3, 3e-3), **execution):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": tokens, "batch_size": 512, "log_every": 50}}
    return parse_spec({"name": name, "base": base, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": list(lrs), "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                       "execution": {"pack_size": 1, "lease_s": 30, "heartbeat_s": 0.5, **execution}})


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_dry_run_prints_the_submission_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["launch", "--slurm", "--storage", "postgresql://me:pa55word@db.example:5432/sweeps", "--sweep", "big",
                 "--partition", "gpu", "--gpus_per_task", "4", "--time", "1-00:00:00", "--array", "16",
                 "--max_concurrent", "6", "--cpus_per_task", "32", "--mem", "256G", "--account", "lab",
                 "--setup", "module load cuda", "--slurm_arg", "exclusive=true", "--dry_run"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --array=0-15%6", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=1440", "#SBATCH --cpus-per-task=32", "#SBATCH --mem=256GB", "#SBATCH --account=lab",
                 "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive=true",
                 "module load cuda", "slurm_array_parallelism = 6", "timeout_min = 1440", "gpus_per_node = 4",
                 "saesweep worker --storage postgresql://me@db.example:5432/sweeps --sweep big --devices auto"):
        assert line in out, line
    assert "pa55word" not in out and "PGPASSWORD" in out
    assert not (tmp_path / "slurm_logs").exists()  # nothing written, nothing submitted


def test_bad_launch_flags_exit_2(tmp_path, capsys):
    assert main(["launch", "--slurm", "--sweep", "x", "--dry_run"]) == 2  # no storage
    assert "--storage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["launch", "--slurm", "--storage", "x.journal", "--sweep", "x", "--time", "soon"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["launch", "--storage", "x.journal", "--sweep", "x"])  # neither --slurm nor --local
    assert main(["launch", "--slurm", "--storage", "x.journal", "--sweep", "x", "--mem", "lots", "--dry_run"]) == 2
    assert parse_mem("500M") == pytest.approx(500 / 1024) and parse_mem("2T") == 2048 and parse_mem("8") == 8


def test_split_password():
    assert split_password("postgresql://u:p%40ss@h:5/db?sslmode=require") == ("postgresql://u@h:5/db?sslmode=require", "p@ss")
    assert split_password("postgresql://u@h/db?password=x") == ("postgresql://u@h/db", "x")
    assert split_password("postgres://u:y@h/db") == ("postgresql://u@h/db", "y")
    assert split_password("/shared/sweep.journal") == ("/shared/sweep.journal", None)
    assert split_password("postgresql://u@h/db") == ("postgresql://u@h/db", None)


def test_local_job_array_runs_the_sweep_end_to_end(tmp_path):
    spec = write_spec(tmp_path, name="arr", sae_types=["relu"], output_dir=str(tmp_path / "runs"),
                      grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                      execution={"pack_size": 1, "lease_s": 30, "heartbeat_s": 0.5})
    out = saesweep("launch", "--local", "--spec", spec, "--array", "2", "--time", "20", "--devices", "cpu",
                   "--folder", tmp_path / "logs" / "%j", "--wait", cwd=tmp_path, check=True, timeout=300)
    text = out.stdout
    assert "4 experiments (relu: 4); 4 new" in text and "Submitted 2 worker task(s) to this machine (submitit" in text
    assert "task 0: exit 0" in text and "task 1: exit 0" in text
    assert "Sweep 'arr': 4 complete, 0 failed, 0 waiting, 0 running" in text
    store = SweepStore(str(tmp_path / "runs" / "arr" / "sweep.journal"), "arr", create=False)
    done = complete_count_by_trial(store)
    assert len(done) == 4 and set(done.values()) == {1}
    logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*_log.out"))
    assert logs.count("saesweep launch: task") == 2  # both array tasks ran a worker


def test_preempted_task_checkpoints_is_requeued_and_resumes(tmp_path, monkeypatch):
    """The signal Slurm sends before a time limit or preemption (USR2) reaches a task mid-trial:
    its worker checkpoints the pack and requeues the trial, submitit requeues the task, and the
    requeued task resumes the pack from the checkpoint; every trial completes exactly once."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = tiny_spec(tmp_path, name="pre", tokens=500_000, lrs=(1e-3,), checkpoint_every_s=0.3)
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    first = store.records()[0].trial_id
    opts = LaunchOptions(storage=spec.storage_url, sweep="pre", cluster="local", array=1, time_min=30,
                         devices="cpu", folder=str(tmp_path / "logs" / "%j"))
    (job,) = submit(opts)
    ckpts = spec.sweep_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        if store.counts()["running"] == 1 and list(ckpts.glob("*.safetensors")):
            break
        time.sleep(0.1)
    else:
        job.cancel()
        pytest.fail("the task never got mid-trial with a checkpoint")
    tasks = [p for p in children(int(job.job_id)) if "submitit.core._submit" in cmdline(p)]
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)  # what Slurm sends (--signal=USR2@...) before the end
    deadline = time.time() + 180
    while not job.done() and time.time() < deadline:
        time.sleep(0.5)
    assert job.done(), "the requeued task did not finish"
    result = job.result()
    assert result["exit_code"] == 0 and result["requeues"] == 1
    store = SweepStore(spec.storage_url, "pre", create=False)
    assert complete_count_by_trial(store) == {first: 1}
    attempts = [t for t in store.trials() if t.user_attrs["trial_id"] == first]
    assert [t.state for t in attempts] == [FAIL, COMPLETE]
    assert attempts[0].user_attrs["reason"] == INTERRUPTED  # stopped and requeued, the attempt not counted
    assert int(attempts[1].user_attrs.get("attempt", 1)) == 1
    assert attempts[1].user_attrs["metrics"]["resumed_from_step"] > 0  # resumed from the pack's checkpoint
    log = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*_log.out"))
    assert "preempted or out of time: stopping the workers" in log and "requeued 1 time(s)" in log
