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


def test_the_threshold_is_calibrated_to_k_on_held_out_tokens_by_hand():
    sae = identity_sae(k=1)
    sae.threshold.fill_(0.1)  # a running estimate that lags: L0 3 on these tokens
    x = torch.tensor([[5.0, 4.0, 0.5], [1.0, 0.2, 3.0]])  # activations 5 4 3 1 .5 .2: k * N = 2 kept
    rows = sae.after_training(x, batch_size=1)  # one token per chunk: each keeps 4 candidates
    assert sae.threshold.item() == 3.0  # the 3rd largest: codes above it are exactly 5 and 4
    import pytest

    assert rows == [{"threshold_calibrated": 3.0, "threshold_running": pytest.approx(0.1),
                     "threshold_calibration_tokens": 2.0}]
    assert int((sae.encode(x)[0] != 0).sum()) == 2


def test_after_training_the_held_out_l0_of_batchtopk_and_matryoshka_is_k(tmp_path):
    from saesweep.training.run import run

    for sae_type in ("batchtopk", "matryoshka"):
        r = run({"sae_type": sae_type, "k": 6, "source": {"kind": "synthetic", "d_in": 16, "n_features": 64},
                 "train": {"tokens": 20480, "batch_size": 1024}, "eval": {"tokens": 4096},
                 "output_dir": str(tmp_path)}, show_progress=False)
        assert abs(r.metrics["l0"] / 6 - 1) < 0.02, (sae_type, r.metrics["l0"], r.metrics["threshold_running"])
        assert r.metrics["threshold_calibration_tokens"] == 4096
        import json

        cfg = json.loads((r.run_dir / "cfg.json").read_text())
        assert cfg["metadata"]["threshold_calibration"]["tokens"] == 4096
