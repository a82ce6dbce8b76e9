"""Dead-feature resampling: a feature forced dead comes back, only in its own member, with its
optimiser state reset; the fused and the autograd step resample alike."""

import pytest
import torch

from saesweep import saes
from saesweep.data import open_source
from saesweep.training.optim import PackedAdam
from saesweep.training.resample import (
    ENCODER_NORM_FRACTION,
    Resampler,
    dead_features,
    resample_member,
)
from saesweep.training.trainer import train_pack

HP = {"relu": {}, "gated": {"aux_coeff": 1.0},
      "hard_concrete": {"initial_beta": 0.5, "input_dependent_gates": True},
      "gated_hard_concrete": {"aux_coeff": 1.0, "initial_beta": 0.5}}


@pytest.mark.parametrize("sae_type", list(HP))
def test_resampling_revives_a_feature_forced_dead(sae_type):
    d, m = 8, 16
    sae = saes.get(sae_type)(d, m, [{"sparsity_coeff": 0.1, **HP[sae_type]}] * 2, [0, 1])
    opt = PackedAdam(sae.named_parameters(), torch.tensor([1e-3, 1e-3]))
    x = torch.randn(4096, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # kill feature 5 of member 1: its encoder columns point nowhere useful
        for name in sae.encoder_weights:
            getattr(sae, name)[1][:, 5] = 0
        for name, p in sae.named_parameters():
            if p.dim() == 2 and name != "b_dec":
                p[1, 5] = -50.0 if name in ("b_enc", "b_gate", "b_mag", "log_alpha") else p[1, 5]
        for st in (opt.exp_avg, opt.exp_avg_sq):
            for v in st.values():
                v.fill_(1.0)
    before = {k: p.detach().clone() for k, p in sae.named_parameters()}
    dead, _ = dead_features(sae.member(1), x)
    assert dead[5] and int(dead.sum()) >= 1
    n = resample_member(sae, opt, 1, x)
    assert n == int(dead.sum())
    dead_after, _ = dead_features(sae.member(1), x)
    assert not dead_after[5]  # it fires again
    w = sae.W_dec[1, 5]
    assert w.norm().item() == pytest.approx(1.0, abs=1e-5)
    # its decoder row is the direction of one of the inputs (minus b_dec), its encoder column
    # that direction scaled to a fifth of the living features' mean norm
    cos = torch.nn.functional.cosine_similarity(x - sae.b_dec[1], w[None], dim=-1)
    assert cos.max().item() == pytest.approx(1.0, abs=1e-5)
    alive = ~dead
    if sae_type == "hard_concrete":  # its own start: see the next test
        x_enc = torch.matmul(x - sae.b_dec[1], sae.W_gate[1][:, 5]) + sae.b_gate[1, 5]
        assert 0.03 < (x_enc > 0).float().mean().item() < 0.07
    elif sae_type == "gated_hard_concrete":  # the same start through its shared encoder column
        raw = torch.matmul(x - sae.b_dec[1], sae.W_enc[1][:, 5])
        assert 0.03 < (raw + sae.b_gate[1, 5] > 0).float().mean().item() < 0.07
        proj = torch.matmul(x - sae.b_dec[1], w)  # the magnitude is the projection on the new row
        torch.testing.assert_close(raw * sae.r_mag[1, 5].exp() + sae.b_mag[1, 5], proj, rtol=1e-4, atol=1e-5)
    else:
        enc = getattr(sae, sae.encoder_weights[0])[1][:, 5]
        ref = before[sae.encoder_weights[0]][1][:, alive].norm(dim=0).mean() * ENCODER_NORM_FRACTION
        assert enc.norm().item() == pytest.approx(ref.item(), rel=1e-5)
    for st in (opt.exp_avg, opt.exp_avg_sq):
        assert (st["W_dec"][1, 5] == 0).all() and (st["W_dec"][1, alive] == 1).all()
        assert (st["W_dec"][0] == 1).all()
    # member 0 and member 1's living features are untouched
    for k, p in sae.named_parameters():
        torch.testing.assert_close(p[0], before[k][0], rtol=0, atol=0)
        if k == "W_dec":
            torch.testing.assert_close(p[1, alive], before[k][1, alive], rtol=0, atol=0)


def test_a_resampled_hard_concrete_gate_opens_on_the_inputs_along_its_direction():
    """Gate logit = 4 (proj - q95) / sd(proj) for proj = (x - b_dec) . w_dec; magnitude = proj."""
    d, m = 4, 8
    sae = saes.get("hard_concrete")(d, m, [{"sparsity_coeff": 0.1, **HP["hard_concrete"]}], [0])
    x = torch.randn(20_000, d, generator=torch.Generator().manual_seed(1)) * torch.tensor([3.0, 1, 1, 1])
    dirs = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.reinit_features(0, torch.tensor([2, 6]), dirs, x)
    # N(0, 3) along e0, N(0, 1) along e1: the 95th percentile is 1.645 sd
    torch.testing.assert_close(sae.W_gate[0][:, 2], torch.tensor([4 / 3.0, 0, 0, 0]), rtol=0.03, atol=0.01)
    assert sae.b_gate[0, 2].item() == pytest.approx(-4 * 1.645, rel=0.05)
    assert sae.b_gate[0, 6].item() == pytest.approx(-4 * 1.645, rel=0.05)
    torch.testing.assert_close(sae.W_mag[0][:, 6], dirs[1])
    la = sae.log_alpha_of(x[None])[0][:, [2, 6]]
    assert ((la > 0).float().mean(0) - 0.05).abs().max() < 0.01


@pytest.mark.parametrize("sae_type", ["hard_concrete", "gated_hard_concrete"])
def test_features_resampled_together_share_their_magnitude(sae_type):
    """100 features resampled at once, each open on 5 % of the inputs: about 5 open per token,
    so each magnitude is the projection over sqrt(5) (2 at once: the full projection)."""
    d, m = 4, 128
    sae = saes.get(sae_type)(d, m, [{"sparsity_coeff": 0.1, **HP[sae_type]}], [0])
    x = torch.randn(20_000, d, generator=torch.Generator().manual_seed(1))
    dirs = torch.nn.functional.normalize(torch.randn(100, d, generator=torch.Generator().manual_seed(2)), dim=-1)
    idx = torch.arange(100)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.reinit_features(0, idx, dirs, x)
        sae.reinit_features(0, idx[:2], dirs[:2], x)  # two at once: the full projection
    if sae_type == "hard_concrete":  # magnitude = relu(W_mag . x + b_mag)
        magnitude = sae.W_mag[0][:, idx]
    else:  # magnitude = exp(r_mag) W_enc . x + b_mag
        magnitude = sae.W_enc[0][:, idx] * sae.r_mag[0, idx].exp()
    torch.testing.assert_close(magnitude[:, 2:], dirs[2:].T / 5 ** 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(magnitude[:, :2], dirs[:2].T, rtol=1e-5, atol=1e-6)


def test_schedule():
    r = Resampler(total_steps=100, every=0.1, until=0.5, batch_size=1024)
    assert [s for s in range(100) if r.due(s)] == [9, 19, 29, 39, 49]
    assert r.window.maxlen == 64  # 65536 tokens of the most recent batches
    assert not any(Resampler(100, 0.0, 0.5, 1024).due(s) for s in range(100))


@pytest.mark.parametrize("sae_type", list(HP))
def test_packs_resample_per_member_alike_in_fused_and_autograd_steps(tiny_cfg, monkeypatch, sae_type):
    """Training with the decoder-gradient projection and resampling on: the fused and the
    autograd step give the same pack (and the same resampled features)."""
    # a large coefficient kills features; the small one keeps them
    big = 3.0
    cfgs = [tiny_cfg(sae_type=sae_type, sparsity_coeff=c, train={"tokens": 25_600, "batch_size": 256,
                                                                  "resample_every": 0.2, "resample_until": 0.8})
            for c in (0.01, big)]
    data = open_source(cfgs[0])
    runs = {}
    for step in ("fused", "autograd"):
        monkeypatch.setenv("SAESWEEP_STEP", step)
        runs[step] = train_pack(cfgs, data, show_progress=False)
    fused, auto = runs["fused"], runs["autograd"]
    assert [m.resampled for m in fused.members] == [m.resampled for m in auto.members]
    if sae_type in ("relu", "gated"):  # features die there within the 100 steps
        assert fused.members[1].resampled > 0
    for name, p in fused.sae.named_parameters():
        # a gate near its threshold may round to the other side in one of the two steps and move
        # a few weights by 1e-3: the packs agree as wholes (a wrong gradient differs by O(1))
        gap = float((getattr(auto.sae, name) - p).norm() / p.norm().clamp_min(1e-12))
        assert gap < 1e-3, f"{name}: relative difference {gap:.2e}"
