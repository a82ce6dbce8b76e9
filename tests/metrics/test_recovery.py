"""Recovery metrics against hand-computed values on tiny worlds, and on a real synthetic source."""

import math

import pytest
import torch

from saesweep.config.experiment import SyntheticSource
from saesweep.data.synthetic import SyntheticActivations
from saesweep.metrics.recovery import recovery_metrics

# three true features in R^3 (the axes), four tokens
GT = torch.eye(3)
TRUTH = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)


def test_a_perfect_sae_scores_one_and_a_silent_one_zero():
    perfect, = recovery_metrics([TRUTH], TRUTH, [GT], GT)
    assert perfect["feature_f1"] == perfect["feature_f1_greedy"] == perfect["feature_mcc"] == 1.0
    assert perfect["frac_f1_50"] == perfect["decoder_frac_cos90"] == perfect["decoder_mmcs"] == 1.0
    silent, = recovery_metrics([torch.zeros_like(TRUTH)], TRUTH, [GT], GT)
    assert silent["feature_f1"] == silent["feature_mcc"] == silent["frac_f1_50"] == 0.0


def test_a_decoder_aligned_sae_that_never_fires_scores_low_where_the_decoder_figures_do_not():
    fires = torch.zeros_like(TRUTH)
    fires[0, 0] = True  # latent 0 fires once, on a token where feature 0 is active
    row, = recovery_metrics([fires], TRUTH, [GT], GT)
    assert row["decoder_frac_cos90"] == 1.0  # every direction is right...
    # ...but feature 0: precision 1, recall 1/2 -> F1 2/3; features 1 and 2: 0
    assert row["feature_f1"] == pytest.approx((2 / 3) / 3)


def test_matching_is_one_to_one_and_f1_counts_false_firings():
    # latent 0 points at feature 1, latent 1 at feature 0 (permuted), latent 2 at neither
    dec = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0.6, 0.8]])
    fires = torch.tensor([[0, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    row, = recovery_metrics([fires], TRUTH, [dec], GT)
    # feature 0 <-> latent 1: fires on tokens 0, 1, active on 0, 1: F1 1
    # feature 1 <-> latent 0: fires on 1, 2, 3; active on 1, 2: tp 2, precision 2/3, recall 1: F1 0.8
    # feature 2 <-> latent 2 (cosine 0.8): fires on 2; active on 2, 3: precision 1, recall 1/2: F1 2/3
    assert row["feature_f1"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert row["frac_f1_50"] == 1.0
    assert row["decoder_frac_cos90"] == pytest.approx(2 / 3)
    assert row["decoder_mmcs"] == pytest.approx((1 + 1 + 0.8) / 3)
    # MCC of feature 1 / latent 0 over 4 tokens: tp 2, fp 1, fn 0, tn 1
    mcc1 = (2 * 1 - 1 * 0) / math.sqrt(3 * 2 * 2 * 1)
    assert row["feature_mcc"] == pytest.approx((1 + mcc1 + (1 * 2 - 0 * 1) / math.sqrt(1 * 2 * 3 * 2)) / 3)


def test_greedy_matching_lets_two_features_share_a_latent():
    dec = torch.tensor([[1.0, 0.1, 0], [0.9, 0.2, 0], [0, 0, 1]])  # latents 0 and 1 both near feature 0
    dec = dec / dec.norm(dim=-1, keepdim=True)
    fires = TRUTH.clone()
    row, = recovery_metrics([fires], TRUTH, [dec], GT)
    # Hungarian gives feature 1 latent 1 (the only one left), whose firing matches feature 1: F1 1 everywhere
    assert row["feature_f1"] == 1.0
    # greedy: feature 1's best cosine is latent 1 too (0.2/|.| > 0.1/|.|): same here
    assert row["feature_f1_greedy"] == 1.0


def test_a_narrower_sae_is_scored_over_its_latents():
    fires = TRUTH[:, :1]  # one latent, exactly feature 0
    row, = recovery_metrics([fires], TRUTH, [GT[:1]], GT)
    assert row["feature_f1"] == 1.0  # over latents
    assert row["frac_f1_50"] == pytest.approx(1 / 3)  # over true features


def test_synthsaebench_scores_duplicated_latents_that_the_one_to_one_match_does_not():
    # six latents, each true feature's direction twice (one with flipped sign), firing exactly with it
    dec = torch.cat([GT, -GT])
    fires = torch.cat([TRUTH, TRUTH], 1)
    row, = recovery_metrics([fires], TRUTH, [dec], GT)
    assert row["synthsaebench_f1"] == row["synthsaebench_precision"] == row["synthsaebench_recall"] == 1.0
    assert row["synthsaebench_uniqueness"] == 0.5
    # one to one: three latents matched at signed cosine 1 and F1 1, the three duplicates left out
    assert row["feature_f1"] == 1.0 and row["feature_f1_greedy"] == 1.0
    # a latent that never fires counts 0 in the mean over latents
    silent = fires.clone()
    silent[:, 5] = False
    row, = recovery_metrics([silent], TRUTH, [dec], GT)
    assert row["synthsaebench_f1"] == pytest.approx(5 / 6)


def test_synthsaebench_metrics_equal_sae_lens_compute_classification_metrics():
    evals = pytest.importorskip("sae_lens.synthetic.evals")
    g = torch.Generator().manual_seed(0)
    n, F, m, d = 2000, 24, 16, 12
    gt = torch.randn(F, d, generator=g)
    dec = gt[torch.randint(0, F, (m,), generator=g)] + 0.5 * torch.randn(m, d, generator=g)
    truth = torch.rand(n, F, generator=g) < 0.1
    codes = torch.relu(torch.randn(n, m, generator=g) - 1.0)  # real-valued codes, some latents rarely on
    codes[:, 3] = 0  # a dead latent
    row, = recovery_metrics([codes], truth, [dec], gt)
    ref = evals.compute_classification_metrics(codes, truth.float(), dec, gt)
    assert row["synthsaebench_f1"] == pytest.approx(ref.f1_score, abs=1e-6)
    assert row["synthsaebench_precision"] == pytest.approx(ref.precision, abs=1e-6)
    assert row["synthsaebench_recall"] == pytest.approx(ref.recall, abs=1e-6)
    assert row["synthsaebench_uniqueness"] == pytest.approx(evals.feature_uniqueness(dec, gt))


def test_absorption_counts_a_parent_latent_silent_where_a_child_fires():
    # feature 0 is the parent of feature 1; both active on tokens 1 and 2, parent alone on token 0
    truth = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    absorbed = truth.clone()
    absorbed[1:3, 0] = False  # the parent's latent fires only without the child
    row, = recovery_metrics([absorbed], truth, [GT], GT, hierarchy=[(0, [1])])
    assert row["absorption"] == 1.0
    half = truth.clone()
    half[1, 0] = False
    row, = recovery_metrics([half], truth, [GT], GT, hierarchy=[(0, [1])])
    assert row["absorption"] == 0.5
    row, = recovery_metrics([truth], truth, [GT], GT, hierarchy=[(0, [1])])
    assert row["absorption"] == 0.0


def test_the_realistic_world_has_its_structure():
    cfg = SyntheticSource(d_in=32, n_features=128, sparsity=0.03)
    data = SyntheticActivations(cfg, eval_tokens=20_000)
    truth = data.eval_truth()
    freq = truth.float().mean(0)
    # heavy tail: the most frequent features fire far more often than the median one
    assert freq.max() > 8 * freq.median()
    assert truth.float().sum(-1).mean() == pytest.approx(data.true_l0, rel=0.08)
    # a child never fires without its parent, and siblings exclude each other
    for parent, children in data.hierarchy:
        kids = truth[:, children]
        assert not (kids.any(-1) & ~truth[:, parent]).any()
        assert (kids.sum(-1) <= 1).all()
        assert kids.any()
    # the same seed is the same world, batch by batch; another seed is another world
    again = SyntheticActivations(cfg, eval_tokens=20_000)
    assert torch.equal(next(again.train_batches(64, 3, start=5)), next(data.train_batches(64, 3, start=5)))
    other = SyntheticActivations(cfg.model_copy(update={"seed": 1}), eval_tokens=256)
    assert not torch.equal(other.ground_truth, data.ground_truth)


def test_correlation_changes_co_occurrence_not_frequency():
    base = dict(d_in=16, n_features=64, sparsity=0.05, hierarchy_parents=0)
    free = SyntheticActivations(SyntheticSource(**base, correlation_rank=0), eval_tokens=40_000).eval_truth().float()
    tied = SyntheticActivations(SyntheticSource(**base, correlation_scale=0.9), eval_tokens=40_000).eval_truth().float()
    assert torch.allclose(free.mean(0), tied.mean(0), atol=0.01)
    corr = lambda t: torch.corrcoef(t.T).nan_to_num().fill_diagonal_(0).abs().mean()  # noqa: E731
    assert corr(tied) > 3 * corr(free)


def test_the_probe_ceiling_is_one_where_features_are_separable_and_chance_where_they_are_not():
    from saesweep.metrics.recovery import probe_f1

    g = torch.Generator().manual_seed(0)
    truth = torch.rand(4000, 6, generator=g) < 0.2
    x = truth.float() @ torch.eye(6)  # orthogonal features, no noise: a linear probe separates them
    assert probe_f1(x[:3000], truth[:3000], x[3000:], truth[3000:]) == pytest.approx(1.0, abs=0.01)
    noise = torch.randn(4000, 6, generator=g)  # activations that carry nothing about the features
    assert probe_f1(noise[:3000], truth[:3000], noise[3000:], truth[3000:]) < 0.45
