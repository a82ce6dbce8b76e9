"""The realistic world's sparse draw against the model it samples: a dense Gaussian copula with a
continuous correlation factor, the same frequencies, loadings, hierarchy and magnitudes."""

import pytest
import torch

from saesweep.config.experiment import SyntheticSource
from saesweep.data.synthetic import STREAM_CHUNK, SyntheticActivations, dense_active

N = 60_000


@pytest.fixture(scope="module")
def world():
    cfg = SyntheticSource(d_in=32, n_features=256, sparsity=0.03, correlation_scale=0.5)
    data = SyntheticActivations(cfg, eval_tokens=N)
    return data, data.eval_truth().float(), dense_active(data, N, torch.Generator().manual_seed(0)).float()


def test_each_feature_fires_at_its_frequency(world):
    data, fast, _ = world
    freq = data.world.frequency
    # binomial noise at N tokens: 4 standard errors
    assert ((fast.mean(0) - freq).abs() <= 4 * (freq * (1 - freq) / N).sqrt() + 1e-4).float().mean() > 0.99
    assert float(fast.sum(-1).mean()) == pytest.approx(data.true_l0, rel=0.02)


def test_the_sparse_draw_has_the_dense_copulas_statistics(world):
    _, fast, slow = world
    assert float(fast.sum(-1).mean()) == pytest.approx(float(slow.sum(-1).mean()), rel=0.03)
    assert float(fast.sum(-1).std()) == pytest.approx(float(slow.sum(-1).std()), rel=0.05)
    cf, cs = (torch.corrcoef(t.T).nan_to_num().fill_diagonal_(0) for t in (fast, slow))
    # the same pairs co-fire: correlations agree pair by pair, and on average in size
    common = (fast.mean(0) > 0.01) & (slow.mean(0) > 0.01)
    a, b = cf[common][:, common].flatten(), cs[common][:, common].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8
    assert float(a.abs().mean()) == pytest.approx(float(b.abs().mean()), rel=0.1)


def test_hierarchy_holds_in_the_sparse_draw(world):
    data, fast, _ = world
    truth = fast.bool()
    for parent, children in data.hierarchy:
        kids = truth[:, children]
        assert not (kids.any(-1) & ~truth[:, parent]).any()
        assert (kids.sum(-1) <= 1).all()
        assert float(kids.any(-1)[truth[:, parent]].float().mean()) == pytest.approx(data.cfg.child_probability, abs=0.06)


def test_a_batch_is_the_same_whatever_the_batch_size_and_start():
    data = SyntheticActivations(SyntheticSource(d_in=16, n_features=64), eval_tokens=256)
    whole = torch.cat([b for _, b in zip(range(3), data.train_batches(STREAM_CHUNK, 7))])
    for size in (300, 1000):
        it = data.train_batches(size, 7)
        assert torch.equal(torch.cat([next(it) for _ in range(3 * STREAM_CHUNK // size)]),
                           whole[: 3 * STREAM_CHUNK // size * size])
        assert torch.equal(next(data.train_batches(size, 7, start=5)), whole[5 * size:6 * size])


def test_the_training_stream_and_the_codes_draw_the_same_activations():
    data = SyntheticActivations(SyntheticSource(d_in=16, n_features=64, noise_std=0.1), eval_tokens=256)
    x, codes = data._raw_and_codes(500, 3, 2)
    assert torch.allclose(data._raw(500, 3, 2), x, atol=1e-5)
    assert (codes > 0).sum(-1).float().mean() > 0


def test_the_held_out_truth_and_codes_are_the_held_out_activations():
    data = SyntheticActivations(SyntheticSource(d_in=16, n_features=64), eval_tokens=2000)
    codes = data.eval_codes()
    assert torch.equal(codes > 0, data.eval_truth())
    assert torch.allclose(codes @ data.ground_truth * data.scale, data.eval_activations(), atol=1e-5)
    some = torch.tensor([3, 10, 40])
    assert torch.equal(data.eval_codes(some), codes[:, some])
