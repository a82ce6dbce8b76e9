"""Every bad input answers with exit code 2 and one line naming the field, flag or path, and
writes nothing."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from saesweep.cli import main

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_sweep" / "runs" / "legacy" / "sweep.journal"
TINY = {"sae_type": "relu", "source": {"kind": "synthetic", "d_in": 8, "n_features": 16},
        "train": {"tokens": 2048, "batch_size": 256}, "eval": {"tokens": 512}}


def setup_files(root: Path) -> None:
    (root / "c.yaml").write_text(yaml.safe_dump(TINY))
    (root / "ratio.yaml").write_text(yaml.safe_dump({**TINY, "dict_size_ratio": 1.3}))
    (root / "huge.yaml").write_text(yaml.safe_dump({**TINY, "train": {"tokens": 10**14, "batch_size": 256}}))
    (root / "extra.yaml").write_text(yaml.safe_dump({**TINY, "learning_rate": 1e-3}))
    (root / "afile").write_text("not a folder")
    (root / "big.yaml").write_text(yaml.safe_dump({"name": "big", "sae_types": ["relu"], "grids": {"relu": {
        "lr": [1e-3], "dict_size_ratio": [1e12], "sparsity_coeff": [0.1]}}}))
    shutil.copy(LEGACY, root / "legacy.journal")
    (root / "garbage.journal").write_bytes(bytes(range(256)) * 8)
    lines = LEGACY.read_bytes().split(b"\n")
    lines[3] = lines[3][:20]  # a torn write in the middle of the journal
    (root / "torn.journal").write_bytes(b"\n".join(lines))


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


CASES = [
    (["train", "ratio.yaml"], "dict_size_ratio"),
    (["train", "c.yaml", "--device", "cuda:3"], "cuda:3"),
    (["train", "c.yaml", "--output_dir", "afile/sub"], "output_dir afile/sub"),
    (["train", "c.yaml", "--output_dir", "/proc/x"], "output_dir /proc/x"),
    (["status", "--storage", "garbage.journal", "s"], "line 1 of the sweep journal"),
    (["status", "--storage", "torn.journal", "legacy"], "line 4 of the sweep journal"),
    (["worker", "--storage", "none.journal", "--sweep", "nosuch"], "none.journal"),
    (["results", "legacy", "--storage", "torn.journal", "--output", "/dev/full/x"], "torn.journal"),
    (["results", "runs/x", "--output", "/dev/full/x"], "runs/x"),
    (["generate", "--output_dir", "afile"], "--output_dir afile"),
    (["sweep", "--sae_types", "relu", "--limit", "1", "--output_dir", "afile"], "afile"),
    (["train", "huge.yaml"], "train.tokens"),  # it would train for ever
    (["train", "extra.yaml"], "learning_rate: unknown field (the fields of sae_type 'relu': "),
    (["sweep", "--sae_types", "relu", "--limit", "1", "--storage", "", "--dry_run"], "--storage: empty"),
    (["sweep", "--sae_types", "relu", "--limit", "1", "--name", "x" * 300, "--dry_run"], "at most 100 characters"),
    (["sweep", "--spec", "big.yaml"], "dict_size_ratio 1e+12"),  # the memory plan: fits no device
    (["sweep", "--sae_types", "relu", "--limit", "1", "--output_dir", "afile/x"], "--output_dir afile/x"),
    (["report", "legacy", "--storage", "legacy.journal", "--out", "afile"], "--out afile"),
    (["report", "legacy", "--storage", "legacy.journal", "--metric", "bogus"], "--metric bogus"),
    (["verify", "nosuch"], "nosuch"),
]


@pytest.mark.parametrize("argv,names", CASES, ids=[" ".join(c[0][:2]) + f" {i}" for i, c in enumerate(CASES)])
def test_bad_input_exits_2_naming_it_and_writes_nothing(argv, names, tmp_path, monkeypatch, capsys):
    if "cuda:3" in argv and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    if "/proc/x" in argv and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    setup_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and names in err, err
    assert tree(tmp_path) == before  # nothing written


def test_results_to_a_full_disk_leave_no_partial_file(tmp_path, monkeypatch, capsys):
    """A write that fails half way (ENOSPC) leaves neither the file nor a temp file."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    shutil.copytree(LEGACY.parents[2], tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")
    out = tmp_path / "out"
    out.mkdir()
    import saesweep.io as io

    real = io.os.fdopen

    def full(fd, mode="r", *a, **k):  # every write reports a full disk
        os.close(fd)
        return real(os.open("/dev/full", os.O_WRONLY), mode, *a, **k)

    monkeypatch.setattr(io.os, "fdopen", full)
    assert main(["results", "runs/legacy", "--output", str(out / "r")]) == 2
    assert "No space left" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_a_password_typed_in_the_storage_url_is_warned_about(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--sae_types", "relu", "--limit", "1", "--storage", "postgresql://u:s3cret@127.0.0.1:9/db",
                 "--dry_run"])
    err = capsys.readouterr().err
    assert code == 0 and "password in --storage is visible" in err and "~/.pgpass" in err
    assert "s3cret" not in err
