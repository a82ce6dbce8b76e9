"""Random baselines: their math on hand-checkable cases, and how a sweep shows them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from sweep_helpers import saesweep, write_spec

from saesweep.config.experiment import SyntheticSource
from saesweep.data.synthetic import SyntheticActivations
from saesweep.metrics import baselines as B

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_sweep"


@pytest.fixture(scope="module")
def world():
    return SyntheticActivations(SyntheticSource(d_in=16, n_features=48, sparsity=0.05), eval_tokens=4096)


@pytest.mark.parametrize("kind", [k for k in B.KINDS if k != "oracle"])
def test_every_baseline_fires_k_latents_per_token(world, kind):
    b = B.build(kind, world, 64, 3, steps=20)
    codes = b.encode(world.eval_activations())
    fires = (codes != 0).sum(-1)
    assert fires.max() <= 3 and fires.float().mean() > 2.5
    row = B.score(b, world, downstream=False)
    assert row["l0"] == pytest.approx(fires.float().mean().item())
    assert 0 < row["fvu"] <= 1.0 and 0 <= row["feature_f1"] <= 1.0
    if kind != "true_dictionary":  # learned nothing: far from the true features
        assert row["feature_f1"] < 0.5


def test_the_true_dictionary_scores_far_above_the_random_baselines(world):
    truth = B.score(B.build("true_dictionary", world, 64, 3), world, downstream=False)
    rand = B.score(B.build("random_decoder", world, 64, 3), world, downstream=False)
    assert truth["d_sae"] == 48 and truth["decoder_frac_cos90"] == 1.0
    assert truth["feature_f1"] > 2 * rand["feature_f1"] and truth["fvu"] < rand["fvu"]


def test_the_references_are_as_wide_as_the_saes_and_the_oracle_is_perfect_on_its_latents(world):
    top = world.feature_frequency().argsort(descending=True)[:16]
    narrow = B.build("true_dictionary", world, 16, 3)
    assert narrow.W_dec.shape == (16, 16)
    assert torch.allclose(narrow.W_dec, world.ground_truth[top.sort().values])  # the 16 most frequent
    oracle = B.score(B.build("oracle", world, 16, 3), world, downstream=False)
    assert oracle["d_sae"] == 16 and oracle["feature_f1"] == pytest.approx(1.0)
    assert oracle["l0"] == pytest.approx(float(world.eval_truth()[:, top].sum(-1).float().mean()))
    # with every true direction and no noise it reconstructs exactly
    full = B.score(B.build("oracle", world, 64, 3), world, downstream=False)
    assert full["fvu"] < 1e-6 and full["feature_f1"] == pytest.approx(1.0)
    # the trained-encoder reference is scored over its 16 latents, below the oracle (its FVU can be
    # lower: its codes also project the features the 16 directions leave out)
    ref = B.score(narrow, world, downstream=False)
    assert ref["d_sae"] == 16 and ref["feature_f1"] < oracle["feature_f1"]


def test_pca_at_full_rank_reconstructs_exactly_and_random_firing_is_chance(world):
    pca = B.score(B.build("pca", world, 64, 16), world, downstream=False)
    assert pca["fvu"] < 1e-6 and pca["d_sae"] == 16  # d principal directions span the space
    chance = B.score(B.build("random_firing", world, 64, 3), world, downstream=False)
    assert chance["feature_f1"] < 0.1 and chance["fvu"] > 0.5


def test_default_l0s_spread_over_the_trials():
    assert B.default_l0s([2.0, 8.0, 32.0, 0.1]) == [2, 8, 32]
    assert B.default_l0s([4.0, 4.5]) == [4]
    assert B.default_l0s([]) == []


def test_a_sweep_shows_its_baselines_in_the_summary_results_and_report(tmp_path):
    write_spec(tmp_path, sae_types=["relu"], grids={"relu": {"lr": [0.003], "sparsity_coeff": [0.01, 0.1]}},
               baselines=True)
    proc = saesweep("sweep", cwd=tmp_path, check=True)
    assert "Random baselines" in proc.stdout and "random firing at the same L0" in proc.stdout
    saved = json.loads((tmp_path / "runs" / "seed" / "baselines.json").read_text())
    assert {r["baseline"] for r in saved["rows"]} == set(B.KINDS)  # the true dictionary too: a synthetic source
    assert all("feature_f1" in r for r in saved["rows"])
    res = saesweep("results", "seed", cwd=tmp_path, check=True)
    assert "results_baselines.csv" in res.stdout
    assert (tmp_path / "runs" / "seed" / "results_baselines.csv").read_text().startswith("baseline,")
    saesweep("report", "seed", cwd=tmp_path, check=True)
    html = (tmp_path / "runs" / "seed" / "report" / "report.html").read_text()
    assert "Random baselines" in html and "PCA dictionary" in html
    again = saesweep("baseline", "seed", "--l0", "2,4", "--kinds", "pca", cwd=tmp_path, check=True)
    assert again.stdout.count("PCA dictionary") == 2


def test_bad_baseline_flags_exit_2_naming_the_flag(tmp_path):
    write_spec(tmp_path, sae_types=["relu"], grids={"relu": {"lr": [0.003], "sparsity_coeff": [0.1]}})
    for args, flag in ((["--kinds", "bogus"], "--kinds"), (["--l0", "0"], "--l0"), (["--l0", "x"], "--l0")):
        proc = saesweep("baseline", "seed", *args, cwd=tmp_path)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
    proc = saesweep("baseline", "seed", cwd=tmp_path)  # no sweep yet
    assert proc.returncode == 2 and "seed" in proc.stderr
    assert not (tmp_path / "runs" / "seed" / "baselines.json").exists()


def test_an_old_sweep_with_decoder_only_metrics_loads_in_results_and_report(tmp_path):
    here = tmp_path / "legacy"
    shutil.copytree(LEGACY, here)
    saesweep("results", "runs/legacy", cwd=here, check=True)
    csv = (here / "runs" / "legacy" / "results.csv").read_text()
    header = csv.splitlines()[0].split(",")
    assert "decoder_frac_cos90" in header and "frac_recovered" not in header
    saesweep("report", "runs/legacy", cwd=here, check=True)
    assert (here / "runs" / "legacy" / "report" / "report.html").exists()
    proc = saesweep("baseline", "runs/legacy", "--kinds", "pca", cwd=here, check=True)
    assert "PCA dictionary" in proc.stdout
    saved = json.loads((here / "runs" / "legacy" / "baselines.json").read_text())
    assert saved["source"]["world"] == "toy"  # read as the world it was trained on

