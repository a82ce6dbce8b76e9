"""A storage URL with a password: the password appears in no output, log, results file, job
file, command line (visible to every user in `ps`) or store attribute."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg import PASSWORD, postgres_server, postgres_url  # noqa: F401  (fixtures)
from sweep_helpers import TINY_BASE, env, saesweep, write_spec

from saesweep.cli import main
from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.store import SweepStore
from saesweep.sweep.urls import redact, redact_text
from saesweep.sweep.worker import open_sweep, queue_trials

pytestmark = pytest.mark.postgres


def store_dump(url: str, name: str) -> str:
    """Everything the sweep's study holds, as text."""
    s = SweepStore(url, name, create=False)
    parts = [s.study.user_attrs, s.storage.get_study_system_attrs(s.study_id)]
    for t in s.trials():
        parts += [t.params, t.user_attrs, t.system_attrs]
    return json.dumps(parts, default=str)


def files_text(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cmdlines(pids) -> list[str]:
    out = []
    for p in pids:
        try:
            out.append((Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return out


def watch_cmdlines(proc: subprocess.Popen, timeout: float = 240, until: str = "") -> list[str]:
    """Every command line of the descendants of ``proc`` (not its own), sampled until it exits
    (or, with ``until``, until a command line containing it was seen: then ``proc`` is stopped)."""
    seen: set[str] = set()
    t0 = time.time()
    own = set(cmdlines([proc.pid]))
    while proc.poll() is None and time.time() - t0 < timeout:
        # a child between fork and exec still shows its parent's command line: not its own
        seen.update(c for c in cmdlines(descendants(proc.pid)[1:]) if c not in own)
        if until and any(until in c for c in seen):
            proc.terminate()
            break
        time.sleep(0.1)
    proc.wait(timeout=60)
    return sorted(seen)


def test_password_never_shown_logged_stored_or_passed(tmp_path, postgres_url, capsys, monkeypatch):
    assert PASSWORD in postgres_url
    monkeypatch.chdir(tmp_path)
    spec_file = write_spec(tmp_path, name="pw", sae_types=["relu"], output_dir=str(tmp_path / "runs"),
                           grids={"relu": {"lr": [1e-3, 2e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                           execution={"pack_size": 1, "lease_s": 30, "heartbeat_s": 0.5})
    shown = []
    # a sweep run here, then its status and results
    assert main(["sweep", "--spec", str(spec_file), "--storage", postgres_url, "--devices", "cpu"]) == 0
    assert main(["status", "pw", "--storage", postgres_url]) == 0
    assert main(["results", "pw", "--storage", postgres_url, "--output", str(tmp_path / "res")]) == 0
    assert main(["launch", "--slurm", "--storage", postgres_url, "--sweep", "pw", "--partition", "p",
                 "--gpus_per_task", "1", "--array", "2", "--dry_run"]) == 0
    # a wrong password and an unreachable server: the error names the URL, redacted
    wrong = postgres_url.replace(PASSWORD, "wr0ng-pw-77")
    assert main(["status", "pw", "--storage", wrong]) == 2
    assert main(["status", "pw", "--storage", postgres_url.rsplit("@", 1)[0] + "@127.0.0.1:1/none"]) == 2
    out = capsys.readouterr()
    shown += [out.out, out.err]
    assert "wr0ng-pw-77" not in out.err and "***" in out.err

    # `saesweep worker` on a second sweep, two worker processes: their command lines
    spec2 = parse_spec({"name": "pw2", "base": {**TINY_BASE, "train": {**TINY_BASE["train"], "tokens": 50_000}},
                        "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"), "storage": postgres_url,
                        "grids": {"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                        "execution": {"pack_size": 1, "lease_s": 30, "heartbeat_s": 0.5}})
    queue_trials(open_sweep(spec2), spec2, expand(spec2))
    proc = subprocess.Popen([sys.executable, "-m", "saesweep", "worker", "--storage", postgres_url, "--sweep", "pw2",
                             "--devices", "cpu:0,cpu:1"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = watch_cmdlines(proc)
    shown.append(proc.stdout.read())
    assert proc.returncode == 0, shown[-1]
    workers = [c for c in lines if "saesweep.sweep.worker_main" in c]
    assert workers and all("--storage postgresql://postgres@127.0.0.1" in c for c in workers)
    assert not [c for c in lines if PASSWORD in c]  # (only our own `saesweep worker` command line has it)

    # the job array on this machine: the task's files (pickled task included) and logs
    out = saesweep("launch", "--local", "--storage", postgres_url, "--sweep", "pw2", "--array", "1", "--time", "10",
                   "--devices", "cpu", "--folder", tmp_path / "logs" / "%j", "--wait", cwd=tmp_path, check=True)
    shown += [out.stdout, out.stderr]
    assert "task 0: exit 0" in out.stdout  # the job reached the database with PGPASSWORD from its environment

    for text in shown:
        assert PASSWORD not in text
    assert PASSWORD.encode() not in files_text(tmp_path)  # results, run folders, checkpoints, job pickles, logs
    assert list((tmp_path / "logs").rglob("*.pkl")) and list((tmp_path / "runs").rglob("metrics.json"))
    for name in ("pw", "pw2"):
        assert PASSWORD not in store_dump(postgres_url, name)


def test_redaction_of_every_spelling():
    assert redact("postgresql://u:s3cr/et@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://h/db?user=u&password=zz") == "postgresql://h/db?user=u&password=***"
    assert redact("runs/sweep.journal") == "runs/sweep.journal"
    msg = 'could not connect to "postgresql://u:p%40ss@h/db" (password p@ss rejected)'
    assert "p@ss" not in redact_text(msg, "postgresql://u:p%40ss@h/db")
    assert "p%40ss" not in redact_text(msg, "postgresql://u:p%40ss@h/db")


def test_sweep_dry_run_hides_the_password(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, name="d", sae_types=["relu"], grids={"relu": {"lr": [1e-3]}})
    assert main(["sweep", "--spec", str(spec), "--storage", "postgresql://u:hunter2@db.example/x", "--dry_run"]) == 0
    assert "hunter2" not in capsys.readouterr().out


def test_sweep_worker_processes_get_no_password_on_their_command_line(tmp_path, postgres_url):
    spec = write_spec(tmp_path, name="c", sae_types=["relu"], output_dir=str(tmp_path / "runs"),
                      grids={"relu": {"lr": [1e-3, 2e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                      execution={"pack_size": 1})
    proc = subprocess.Popen([sys.executable, "-m", "saesweep", "sweep", "--spec", str(spec), "--storage", postgres_url,
                             "--devices", "cpu:0,cpu:1"], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = watch_cmdlines(proc, until="saesweep.sweep.worker_main")
    workers = [c for c in lines if "saesweep.sweep.worker_main" in c]
    assert workers and not any(PASSWORD in c for c in workers)
