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
    (root / "empty.yaml").write_text("")
    (root / "hb.yaml").write_text(yaml.safe_dump({"name": "hb", "execution": {"lease_s": 5, "heartbeat_s": 60}}))
    (root / "k.yaml").write_text(yaml.safe_dump({**TINY, "sae_type": "topk", "k": 1000, "dict_size_ratio": 4}))
    (root / "tera.yaml").write_text(yaml.safe_dump({**TINY, "dict_size_ratio": 1e12}))
    (root / "bin.yaml").write_bytes(bytes(range(256)))
    (root / "syntax.yaml").write_text("name: x\nbase: {train: [1, 2}\n")
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
    (["sweep", "--spec", "empty.yaml"], "empty.yaml: empty"),  # not the default sweep
    (["sweep", "--spec", "hb.yaml", "--dry_run"], "heartbeat_s (60) must be at most a third of execution.lease_s (5)"),
    (["train", "k.yaml"], "k: 1000 is above the dictionary size 32"),
    (["train", "tera.yaml"], "dict_size_ratio"),  # the memory plan, as sweep refuses it
    (["sweep", "--spec", "/dev/zero"], "/dev/zero: larger than 1 MiB"),
    (["grid", "--spec", "bin.yaml"], "bin.yaml: not a text file"),
    (["grid", "--spec", "syntax.yaml"], "syntax.yaml: malformed YAML at line 2, column"),
    (["status", "x", "--storage", "postgresql://u:p@[::1"], "not a valid PostgreSQL URL"),
    (["sweep", "--sae_types", "relu", "--limit", "1", "--storage", "sqlite:///nosuchdir/x.db"], "no folder nosuchdir"),
    (["sweep", "--sae_types", "relu", "--limit", "1", "--storage", "sqlite:///nosuchdir/x.db", "--dry_run"],
     "no folder nosuchdir"),
    (["sweep", "--sae_types", "relu", "--limit", "1", "--name", "a b", "--dry_run"], "--name 'a b'"),
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


def test_an_unknown_flag_points_at_set(tmp_path, monkeypatch, capsys):
    setup_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "c.yaml", "--lr", "0.01"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--set lr=0.01" in err, err


def test_a_library_error_is_one_line_unless_debug_is_asked(tmp_path, monkeypatch, capsys):
    from saesweep.cli import sweep as cli_sweep

    def boom(args):
        raise RuntimeError("deep inside a library\nwith more lines")

    monkeypatch.setattr(cli_sweep, "cmd_grid", boom)
    from saesweep.cli import app

    monkeypatch.setitem(app.COMMANDS, "grid", app.COMMANDS["grid"]._replace(handler=boom))
    monkeypatch.chdir(tmp_path)
    assert main(["grid"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("saesweep grid: error: RuntimeError: deep inside a library (SAESWEEP_DEBUG=1 or --debug shows "
                   "the traceback)")
    with pytest.raises(RuntimeError):
        main(["grid", "--debug"])
    monkeypatch.setenv("SAESWEEP_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["grid"])


def test_read_only_commands_leave_a_torn_journal_as_it_is(tmp_path, monkeypatch, capsys):
    shutil.copytree(LEGACY.parents[2], tmp_path / "legacy")
    journal = tmp_path / "legacy" / "runs" / "legacy" / "sweep.journal"
    journal.write_bytes(journal.read_bytes() + b'{"op_code": 5, "trial')  # a torn final record
    before = journal.read_bytes()
    monkeypatch.chdir(tmp_path / "legacy")
    for argv in (["status", "runs/legacy"], ["results", "runs/legacy", "--output", str(tmp_path / "r")],
                 ["verify", "runs/legacy"]):
        main(argv)
        assert journal.read_bytes() == before, argv
    out = capsys.readouterr().out
    assert "partial final record" in out


def test_verify_lists_stray_temporary_files(tmp_path, monkeypatch, capsys):
    shutil.copytree(LEGACY.parents[2], tmp_path / "legacy")
    trial = next((tmp_path / "legacy" / "runs" / "legacy" / "trials").iterdir())
    (trial / ".metrics.json.abc123.tmp").write_text("{")
    assert main(["verify", str(tmp_path / "legacy" / "runs" / "legacy")]) == 1
    out = capsys.readouterr().out
    assert ".metrics.json.abc123.tmp: a stray temporary file" in out


def test_lm_source_inputs_are_checked_before_any_work(tiny_lm, tiny_tokens_parquet, tmp_path, monkeypatch, capsys):
    base = {"sae_type": "relu", "source": {"kind": "hf", "model": str(tiny_lm), "dataset": str(tiny_tokens_parquet),
                                           "hook": "blocks.1.hook_resid_pre", "context_length": 32},
            "train": {"tokens": 2048}, "eval": {"tokens": 512, "ce_tokens": 0}}
    cases = [({"context_length": 100000}, "source.context_length: 100000 is above"),
             ({"text_column": "story"}, "source.text_column:")]
    monkeypatch.chdir(tmp_path)
    for extra, names in cases:
        cfg = {**base, "source": {**base["source"], **extra}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        before = tree(tmp_path)
        assert main(["train", "c.yaml"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and names in err, err
        assert tree(tmp_path) == before


@pytest.mark.parametrize("dry", [True, False])
def test_a_hook_the_model_lacks_is_refused_before_any_work(tiny_lm, tiny_tokens_parquet, tmp_path, monkeypatch,
                                                           capsys, dry):
    """In a source.hook grid axis, a missing module or a block out of range: exit 2 naming the hook
    and what the model has, dry run or not, nothing written."""
    base = {"source": {"kind": "hf", "model": str(tiny_lm), "dataset": str(tiny_tokens_parquet),
                       "hook": "blocks.1.hook_resid_pre", "context_length": 32},
            "train": {"tokens": 2048}, "eval": {"tokens": 512, "ce_tokens": 0}, "output_dir": "runs"}
    monkeypatch.chdir(tmp_path)
    for bad, names in (("model.layers.1.mlpp:out", "no module 'model.layers.1.mlpp'"),
                       ("blocks.7.hook_resid_pre", "out of range")):
        spec = {"name": "hooks", "base": base,
                "grids": {"relu": {"source.hook": ["blocks.1.hook_mlp_out", bad], "sparsity_coeff": [0.1]}}}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
        before = tree(tmp_path)
        assert main(["sweep", "--spec", "s.yaml", "--sae_types", "relu", *(["--dry_run"] if dry else [])]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "source.hook" in err and names in err, err
        assert tree(tmp_path) == before
