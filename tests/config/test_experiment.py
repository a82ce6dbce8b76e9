"""Configs: frozen, unknown keys rejected, architecture fields checked, stable ids."""

import pytest
from pydantic import ValidationError

from saesweep.config.experiment import (
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_config,
)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"lr": -1}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"colour": "red"}, "colour"),
        ({"train": {"steps": 10}}, "train.steps"),
        ({"sae_type": "relu", "aux_coeff": 0.1}, "aux_coeff"),
        ({"sae_type": "gated", "initial_beta": 0.1}, "initial_beta"),
        ({"sae_type": "top_k"}, "sae_type"),
        ({"sae_type": "topk", "sparsity_coeff": 0.1}, "sparsity_coeff"),
        ({"sae_type": "matryoshka", "group_fractions": "0.5,0.25,1"}, "group_fractions"),
        ({"source": {"kind": "hf", "hook": "blocks.2.attn_out"}}, "source.hook"),
        ({"source": {"kind": "mystery"}}, "source"),
        ({"train": {"lr_decay": "exponential"}}, "train.lr_decay"),
        ({"sparsity_coeff": float("nan")}, "sparsity_coeff"),
        ({"dict_size_ratio": 0}, "dict_size_ratio"),
    ],
)
def test_bad_configs_name_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_architecture_defaults_and_roundtrip(tmp_path):
    c = ExperimentConfig(sae_type="gated_hard_concrete", lr=1e-3)
    assert c.aux_coeff == 1.0 and c.initial_beta == 0.5 and c.final_beta is None  # aux 1 as in the paper
    assert "input_dependent_gates" not in c.to_dict()
    p = tmp_path / "c.yaml"
    p.write_text(c.to_yaml())
    assert load_config(p) == c
    with pytest.raises(ValidationError, match="frozen"):
        c.lr = 1.0


def test_trial_id_is_stable_and_ignores_paths_and_device():
    a = ExperimentConfig(sae_type="relu", lr=1e-3)
    b = ExperimentConfig(sae_type="relu", lr=1e-3, output_dir="elsewhere", name="x", train={"device": "cpu"})
    c = ExperimentConfig(sae_type="relu", lr=3e-4)
    assert a.trial_id == b.trial_id != c.trial_id
    assert a.trial_id.startswith("relu-")


def test_malformed_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_trial_id_depends_on_the_loss_convention(monkeypatch):
    """Runs trained under another loss convention get other ids, so a sweep never mixes them."""
    from saesweep import saes

    before = ExperimentConfig(sae_type="relu").trial_id
    assert ExperimentConfig(sae_type="relu").identity()["loss_convention"] == saes.LOSS_CONVENTION
    monkeypatch.setattr(saes, "LOSS_CONVENTION", saes.LOSS_CONVENTION + 1)
    assert ExperimentConfig(sae_type="relu").trial_id != before


def test_an_architecture_revision_changes_its_trial_ids_only(monkeypatch):
    from saesweep import saes

    before = {t: ExperimentConfig(sae_type=t).trial_id for t in ("relu", "hard_concrete")}
    revision = saes.get("hard_concrete").revision
    assert revision >= 1 and ExperimentConfig(sae_type="hard_concrete").identity()["sae_revision"] == revision
    assert "sae_revision" not in ExperimentConfig(sae_type="relu").identity()  # revision 0: ids as before
    monkeypatch.setattr(saes.get("hard_concrete"), "revision", revision + 1)
    assert ExperimentConfig(sae_type="hard_concrete").trial_id != before["hard_concrete"]
    assert ExperimentConfig(sae_type="relu").trial_id == before["relu"]
