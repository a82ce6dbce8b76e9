"""BatchTopK SAE: k * B activations kept over the batch, the inference threshold estimate and
the JumpReLU it becomes at evaluation, by hand."""

import torch

from saesweep import saes
from saesweep.saes.batchtopk import THRESHOLD_MOMENTUM


def identity_sae(k=1):
    sae = saes.get("batchtopk")(3, 3, [{"k": k, "auxk_coeff": 0.0}], [0])
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3)[None])
        sae.W_dec.copy_(torch.eye(3)[None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_top_k_times_batch_over_the_batch_not_per_token():
    sae = identity_sae(k=1)
    x = torch.tensor([[5.0, 4.0, 0.0], [1.0, 0.0, -2.0]])  # the 2 largest are both in token 0
    f = sae.encode(x, train=True)
    torch.testing.assert_close(f[0], torch.tensor([[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
    assert sae.threshold.item() == 4.0  # the first batch sets it: the smallest kept activation
    x2 = torch.tensor([[5.0, 1.0, 0.0], [3.0, 0.0, 0.0]])  # kept 5 and 3
    sae.encode(x2, train=True)
    expected = THRESHOLD_MOMENTUM * 4.0 + (1 - THRESHOLD_MOMENTUM) * 3.0
    assert abs(sae.threshold.item() - expected) < 1e-6


def test_evaluation_is_a_jumprelu_at_the_threshold():
    sae = identity_sae()
    sae.threshold.fill_(2.5)
    x = torch.tensor([[3.0, 2.0, 2.6], [0.1, -4.0, 9.0]])
    torch.testing.assert_close(sae.encode(x)[0], torch.tensor([[3.0, 0.0, 2.6], [0.0, 0.0, 9.0]]))
    state = sae.member_state(0)
    torch.testing.assert_close(state["threshold"], torch.full((3,), 2.5))


def test_batch_top_equals_topk_on_the_candidate_path_and_the_fallbacks():
    from saesweep.saes.batchtopk import batch_top

    flat = torch.randn(300_000, generator=torch.Generator().manual_seed(3))
    for count in (5_000, 100_000):  # candidates from the sample; more than a quarter: plain topk
        vals, idx = batch_top(flat, count, sorted=True)
        ref = flat.topk(count, sorted=True)
        torch.testing.assert_close(vals, ref.values)
        assert torch.equal(flat[idx], vals)
    # a sample that misses the top: every large entry sits off the sampled stride
    spiky = torch.zeros(300_000)
    spiky[1::7] = torch.arange(1, 42_858, dtype=torch.float32)
    vals, idx = batch_top(spiky, 10_000, sorted=True)
    torch.testing.assert_close(vals, spiky.topk(10_000).values)
