"""Small sweeps for tests: a spec file with a tiny base config, and ways to run workers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = {
    "source": {"kind": "synthetic", "d_in": 8, "n_features": 16, "sparsity": 0.1},
    "train": {"tokens": 2048, "batch_size": 1024, "log_every": 1, "dtype": "float32"},  # the same on every CPU
    "eval": {"tokens": 512},
}


def complete_count_by_trial(store) -> dict[str, int]:
    """How many COMPLETE attempts each trial id has in a sweep store (exactly-once: all 1)."""
    from saesweep.sweep.store import COMPLETE

    out: dict[str, int] = {}
    for t in store.trials([COMPLETE]):
        out[t.user_attrs["trial_id"]] = out.get(t.user_attrs["trial_id"], 0) + 1
    return out


def saved_steps(ckpt_dir: Path) -> dict[str, int]:
    """Trial id -> the step its newest pack checkpoint in ``ckpt_dir`` holds (unreadable files skipped)."""
    import json

    from safetensors import safe_open

    out: dict[str, int] = {}
    for f in Path(ckpt_dir).glob("*.safetensors"):
        try:
            with safe_open(str(f), "pt") as fh:
                meta = json.loads(fh.metadata()["saesweep"])
        except Exception:
            continue
        for tid in meta["alive"]:
            out[tid] = max(out.get(tid, 0), int(meta["step"]))
    return out


def write_spec(folder: Path, **fields) -> Path:
    spec = {"base": TINY_BASE, **fields}
    path = Path(folder) / "saesweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def saesweep(*args, cwd: Path, check: bool = False, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "saesweep", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"saesweep {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_worker(storage: str, sweep: str, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saesweep.sweep.worker_main", "--storage", storage, "--sweep", sweep,
                             "--device", "cpu", "--threads", "1", *extra], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lost_connection():
    """Optuna's StorageInternalError wrapping SQLAlchemy's OperationalError, as a worker sees a
    database that went away mid-call."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    try:
        try:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        except OperationalError as e:
            raise StorageInternalError("An exception is raised during the commit.") from e
    except StorageInternalError as wrapped:
        return wrapped


@contextlib.contextmanager
def small_filesystem(size: str):
    """A tmpfs of ``size`` where the test may mount one (root on Linux), else None."""
    folder = Path(tempfile.mkdtemp(prefix="saesweep-full-"))
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def lr_sweep(folder: Path, name: str, n: int, **execution):
    """A parsed spec: ``n`` tiny ReLU trials that differ only in lr (so they may share packs)."""
    from saesweep.config.sweep import parse_spec

    return parse_spec({"name": name, "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(Path(folder) / "runs"),
                       "grids": {"relu": {"lr": [1e-3 * (i + 1) for i in range(n)], "dict_size_ratio": [2.0],
                                          "sparsity_coeff": [0.1]}},
                       "execution": {"lease_s": 30, "heartbeat_s": 0.5, **execution}})
