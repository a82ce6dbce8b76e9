"""``saesweep verify`` names every damaged file of a sweep; ``--retry_failed`` gives trials that
failed for good a fresh attempt, which a plain re-run does not."""

from __future__ import annotations

import yaml
from sweep_helpers import TINY_BASE

from saesweep.cli import main
from saesweep.sweep.store import SweepStore


def write(tmp_path, lrs, **train):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], **train}}
    spec = {"name": "v", "base": base, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
            "grids": {"relu": {"lr": lrs, "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
            "execution": {"pack_size": 2, "max_retries": 0}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "runs" / "v"


def test_verify_passes_an_intact_sweep_and_names_each_damaged_file(tmp_path, capsys):
    folder = write(tmp_path, [1e-3, 2e-3])
    assert main(["sweep", "--spec", str(tmp_path / "spec.yaml")]) == 0
    capsys.readouterr()
    assert main(["verify", str(folder)]) == 0
    assert "all intact" in capsys.readouterr().out
    weights = sorted(folder.rglob("sae_weights.safetensors"))[0]
    blob = bytearray(weights.read_bytes())
    blob[-8:] = bytes(b ^ 0xFF for b in blob[-8:])  # inside the last tensor's data
    weights.write_bytes(bytes(blob))
    metrics = sorted(folder.rglob("metrics.json"))[1]
    metrics.write_text(metrics.read_text().replace('"fvu"', '"fvu" ', 1))  # edited after the run completed
    with open(folder / "sweep.journal", "ab") as fh:
        fh.write(b'{"op_code": 5, "trial')
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {weights}: checksum mismatch" in out
    assert f"DAMAGED {metrics.with_name('complete.json')}: metrics.json changed" in out
    assert "sweep.journal: a partial final record" in out and "3 damaged" in out


def test_retry_failed_gives_diverged_trials_a_fresh_attempt(tmp_path, capsys):
    write(tmp_path, [1e-3, 1e30], grad_clip=None)
    spec = str(tmp_path / "spec.yaml")
    journal = str(tmp_path / "runs" / "v" / "sweep.journal")
    assert main(["sweep", "--spec", spec]) == 1  # one trial diverged
    attempts = {r.trial_id: (r.state, r.attempts) for r in SweepStore(journal, "v", create=False).records()}
    assert sorted(s for s, _ in attempts.values()) == ["complete", "failed"]
    main(["sweep", "--spec", spec])  # a plain re-run: nothing to do
    again = {r.trial_id: (r.state, r.attempts) for r in SweepStore(journal, "v", create=False).records()}
    assert again == attempts
    capsys.readouterr()
    main(["sweep", "--spec", spec, "--retry_failed"])
    assert "Retried 1 trial(s)" in capsys.readouterr().out
    retried = {r.trial_id: (r.state, r.attempts) for r in SweepStore(journal, "v", create=False).records()}
    (bad,) = [t for t, (s, _) in attempts.items() if s == "failed"]
    assert retried[bad][1] == attempts[bad][1] + 1
    assert all(retried[t] == attempts[t] for t in attempts if t != bad)
