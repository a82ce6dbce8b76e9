"""`saesweep train`: success prints the result; bad configs exit 2 naming the field, writing nothing."""

import subprocess
import sys

import pytest
import yaml

from saesweep.cli import main


def write(tmp_path, cfg: dict):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_cli(tmp_path, tiny_cfg, capsys):
    cfg = tiny_cfg(train={"tokens": 20_000}).to_dict()
    assert main(["train", str(write(tmp_path, cfg)), "--set", "train.tokens=10000"]) == 0
    out = capsys.readouterr().out
    assert "fvu=" in out and "feature_f1=" in out and out.index("feature_f1=") < out.index("fvu=")


def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "out"
    p = write(tmp_path, {"sae_type": "relu", "aux_coeff": 0.1, "output_dir": str(out_dir)})
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "aux_coeff" in err and len(err.splitlines()) == 1
    assert not out_dir.exists()


def test_bad_config_exit_code_from_the_real_command(tmp_path):
    p = write(tmp_path, {"lr": -0.1})
    proc = subprocess.run([sys.executable, "-m", "saesweep.cli", "train", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "lr" in proc.stderr and "greater than 0" in proc.stderr


def test_missing_file_and_unknown_flag(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "x.yaml", "--bogus"])
    assert e.value.code == 2
