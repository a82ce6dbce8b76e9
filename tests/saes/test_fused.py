"""Every fast path equals the simple one: fused vs autograd gradients, loop vs stacked packs,
chunked vs whole batches, bf16 within tolerance of fp32, fused Adam vs the plain update.
Speed is measured in benchmarks/, never here."""

import math

import pytest
import torch

from saesweep import saes
from saesweep.data import open_source
from saesweep.saes.kernels import StepPlan, plan_for
from saesweep.training.optim import PackedAdam
from saesweep.training.trainer import train_pack


def registry_variants() -> list[tuple[str, str, dict]]:
    """Every registered architecture with a fused step, at its defaults, and once more for each
    hyperparameter that selects another code path (a bool flipped, an optional float set), so
    a new architecture's fused step is checked without editing this file."""
    out = []
    for name in saes.names():
        cls = saes.get(name)
        if not cls.fused:
            continue
        base = {k: hp.default for k, hp in cls.hyperparams.items()}
        out.append((name, name, base))
        for k, hp in cls.hyperparams.items():
            if hp.type is bool:
                out.append((f"{name}-{k}={not hp.default}", name, {**base, k: not hp.default}))
            elif hp.optional and hp.default is None and hp.type is float:
                out.append((f"{name}-{k}", name, {**base, k: 0.2}))
    return out


VARIANTS = [(t, extra) for _, t, extra in registry_variants()]
IDS = [i for i, _, _ in registry_variants()]
PLANS = [
    StepPlan("fused", "loop", None),
    StepPlan("fused", "loop", 64),
    StepPlan("fused", "stacked", None),
    StepPlan("fused", "stacked", 48),  # 200 tokens: chunks of 48 + a ragged one
]


def make_pack(sae_type, extra, n=3, d=16, m=64):
    """A pack whose members differ in their coefficient and in every integer hyperparameter
    (TopK's k: members of a stacked pack select different counts), with non-trivial biases and,
    for an architecture that tracks dead latents, some of them dead (AuxK's path)."""
    cls = saes.get(sae_type)
    ints = {k: hp.default for k, hp in cls.hyperparams.items() if hp.type is int and hp.default}
    members = [{"sparsity_coeff": 0.1 * (i + 1), **extra, **{k: max(1, v // 4 - 2 * i) for k, v in ints.items()}}
               for i in range(n)]
    sae = cls(d, m, members, list(range(n)))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial biases, so that every gradient term is exercised
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name in ("r_mag", "log_alpha"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if hasattr(sae, "since_fired"):  # a third of the latents dead, the first member none
            sae.since_fired.copy_((torch.rand(sae.since_fired.shape, generator=gen) < 1 / 3) * 1e9)
            sae.since_fired[0] = 0
    return sae


def step(sae, x, plan, dtype="float32"):
    """One step from the pack's current state (its buffers, such as dead-latent trackers and
    thresholds, restored afterwards); returns the losses, the gradients and the updated buffers."""
    for streams in sae.noise:  # the same gate noise for every computation
        for j, g in enumerate(streams):
            g.manual_seed(123 + j)
    before = {k: b.clone() for k, b in sae.named_buffers()}
    losses = sae.train_step(x, progress=0.3, sparsity_scale=0.7, plan=plan, dtype=dtype)
    after = {f"buffer {k}": b.clone() for k, b in sae.named_buffers()}
    for k, b in sae.named_buffers():
        b.copy_(before[k])
    return losses, {**{k: p.grad.clone() for k, p in sae.named_parameters()}, **after}


@pytest.mark.parametrize("sae_type,extra", VARIANTS, ids=IDS)
@pytest.mark.parametrize("plan", PLANS, ids=["loop", "loop-chunked", "stacked", "stacked-chunked"])
def test_fused_step_equals_autograd(sae_type, extra, plan):
    sae = make_pack(sae_type, extra)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 2
    ref_losses, ref = step(sae, x, StepPlan("autograd"))
    losses, grads = step(sae, x, plan)
    for k in ("total", "mse", "sparsity", "aux", "l0"):
        torch.testing.assert_close(getattr(losses, k), getattr(ref_losses, k), rtol=1e-5, atol=1e-6, msg=k)
    # the auxiliary terms, by the names the architecture declares
    assert list(losses.terms) == list(ref_losses.terms) == list(type(sae).aux_terms)
    for k in ref_losses.terms:
        torch.testing.assert_close(losses.terms[k], ref_losses.terms[k], rtol=1e-5, atol=1e-6, msg=k)
    for k, g in ref.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=k)


@pytest.mark.parametrize("sae_type,extra", VARIANTS, ids=IDS)
def test_fused_bf16_is_within_tolerance_of_fp32(sae_type, extra):
    """bf16 (products and big elementwise passes) vs fp32: losses within 3e-3 relative,
    gradients within 3 % (relative L2), the same error class as torch.autocast's."""
    sae = make_pack(sae_type, extra, d=64, m=256)
    # inputs at the trainer's scale (unit mean squared norm)
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0)) / 8
    ref_losses, ref = step(sae, x, StepPlan("autograd"))
    auto_losses, auto = step(sae, x, StepPlan("autograd"), "bfloat16")
    for plan in (StepPlan("fused", "loop", 256), StepPlan("fused", "stacked", None)):
        losses, grads = step(sae, x, plan, "bfloat16")
        for k in ("total", "mse", "sparsity", "l0"):
            ref_k = getattr(ref_losses, k)  # (a TopK type's penalty is 0: 0 / 0 counts as equal)
            rel = ((getattr(losses, k) - ref_k).abs() / ref_k.abs().clamp_min(1e-30)).max()
            assert rel < 3e-3, (k, float(rel))  # bf16 keeps 8 bits: 3.9e-3 relative
        for k, g in ref.items():
            if not g.is_floating_point():
                assert torch.equal(grads[k], g), k
                continue
            err = float((grads[k] - g).norm() / g.norm())
            auto_err = float((auto[k] - g).norm() / g.norm())
            assert err < 3e-2, (k, err, auto_err)
            # codes chosen by rank (TopK types, no sparsity coefficient) flip at near-ties under
            # any rounding, so only the 3 % bound holds for them; smooth codes track autocast
            assert err < 5 * auto_err + 1e-3 or not saes.get(sae_type).uses_sparsity_coeff, (k, err, auto_err)


@pytest.mark.parametrize("sae_type,extra", VARIANTS, ids=IDS)
def test_loop_and_stacked_packs_train_the_same(tiny_cfg, monkeypatch, sae_type, extra):
    lrs = (1e-3, 3e-3, 1e-2)
    cfgs = [tiny_cfg(sae_type=sae_type, lr=lr, **extra, train={"tokens": 12_800, "batch_size": 256})
            for lr in lrs]
    data = open_source(cfgs[0])
    runs = {}
    for mode, chunk in (("loop", ""), ("stacked", ""), ("loop", "96")):
        monkeypatch.setenv("SAESWEEP_PACK_MODE", mode)
        monkeypatch.setenv("SAESWEEP_CHUNK", chunk)
        runs[mode, chunk] = train_pack(cfgs, data, show_progress=False)
    ref = runs["loop", ""]
    fast = saes.get(sae_type).lr_scale  # parameters at a multiple of lr
    for key, other in runs.items():
        for name, p in ref.sae.named_parameters():
            q = getattr(other.sae, name)
            assert float((q - p).detach().norm() / p.detach().norm()) < 1e-3, (key, name)
            if not fast:  # Adam turns rounding differences in near-zero gradients into steps of
                # ~lr each: at 30x lr a few elements move visibly, not the parameter as a whole
                torch.testing.assert_close(q, p, rtol=2e-4, atol=3e-4, msg=f"{key} {name}")
        for a, b in zip(ref.members, other.members):
            assert a.log[-1]["loss"] == pytest.approx(b.log[-1]["loss"], rel=1e-4)


def test_fused_training_follows_the_autograd_reference(tiny_cfg, monkeypatch):
    """Whole runs: the trainer's fused step and the autograd step give the same SAE."""
    cfg = tiny_cfg(sae_type="gated", train={"tokens": 25_600, "batch_size": 256})
    data = open_source(cfg)
    fused = train_pack([cfg], data, show_progress=False)
    monkeypatch.setenv("SAESWEEP_STEP", "autograd")
    auto = train_pack([cfg], data, show_progress=False)
    for name, p in auto.sae.named_parameters():
        torch.testing.assert_close(getattr(fused.sae, name), p, rtol=1e-3, atol=1e-4, msg=name)


def test_stacked_pack_drops_a_diverging_member(tiny_cfg, monkeypatch):
    monkeypatch.setenv("SAESWEEP_PACK_MODE", "stacked")
    ok1, bad, ok2 = (tiny_cfg(lr=lr, train={"tokens": 20_000, "grad_clip": None}) for lr in (1e-3, 1e30, 3e-3))
    data = open_source(ok1)
    pack = train_pack([ok1, bad, ok2], data, show_progress=False)
    assert [m.status for m in pack.members] == ["complete", "diverged", "complete"]
    alone = train_pack([ok2], data, show_progress=False)
    torch.testing.assert_close(pack.sae.W_enc[1], alone.sae.W_enc[0], rtol=2e-4, atol=2e-5)


def test_bf16_training_metrics_close_to_fp32(tiny_cfg):
    from saesweep.metrics.reconstruction import evaluate

    res = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_cfg(train={"tokens": 150_000, "dtype": dtype})
        data = open_source(cfg)
        res[dtype] = evaluate(train_pack([cfg], data, show_progress=False).sae, data)[0]
    for k in ("fvu", "l0"):
        assert res["bfloat16"][k] == pytest.approx(res["float32"][k], rel=0.05), k


def test_noise_does_not_depend_on_chunks_or_threads():
    from saesweep.saes.kernels import draw_uniform, noise_streams

    full = torch.empty(2, 100, 7)
    draw_uniform(list(full), [noise_streams(5), noise_streams(6)])
    parts = torch.empty(2, 100, 7)
    streams = [noise_streams(5), noise_streams(6)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # serial draws
        for s0 in range(0, 100, 24):  # ragged chunks starting at multiples of 24
            draw_uniform(list(parts[:, s0 : s0 + 24]), streams, row0=s0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(full, parts)
    assert not torch.equal(full[0], full[1])  # members have their own streams


def test_plan_rule_and_overrides(monkeypatch):
    for var in ("SAESWEEP_STEP", "SAESWEEP_PACK_MODE", "SAESWEEP_CHUNK"):
        monkeypatch.delenv(var, raising=False)
    cpu = plan_for(torch.device("cpu"), 16, 64, 4096, 4096)
    assert (cpu.kernel, cpu.mode, cpu.chunk) == ("fused", "loop", 1024)
    assert plan_for(torch.device("cpu"), 16, 64, 1024, 4096).chunk is None  # 4096 tokens fit the budget
    assert plan_for(torch.device("cpu"), 1, 64, 32768, 4096).chunk == 128
    # at d >= 512 a chunk holds at least 2d tokens, rounded up to a power of two
    assert plan_for(torch.device("cpu"), 1, 512, 16384, 4096).chunk == 1024
    assert plan_for(torch.device("cpu"), 1, 768, 24576, 4096).chunk == 2048
    assert plan_for(torch.device("cpu"), 1, 768, 6144, 2048).chunk is None
    gpu = plan_for(torch.device("cuda"), 16, 768, 4096, 4096)
    assert (gpu.mode, gpu.chunk) == ("stacked", None)
    assert plan_for(torch.device("cuda"), 64, 768, 32768, 4096).chunk == 128
    monkeypatch.setenv("SAESWEEP_PACK_MODE", "stacked")
    monkeypatch.setenv("SAESWEEP_CHUNK", "100")
    monkeypatch.setenv("SAESWEEP_STEP", "autograd")
    assert plan_for(torch.device("cpu"), 2, 16, 64, 256) == StepPlan("autograd", "stacked", 100)
    monkeypatch.setenv("SAESWEEP_PACK_MODE", "sideways")
    with pytest.raises(ValueError, match="SAESWEEP_PACK_MODE"):
        plan_for(torch.device("cpu"), 2, 16, 64, 256)


def test_fused_adam_equals_the_plain_update():
    torch.manual_seed(0)
    w0 = torch.randn(3, 5, 4)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    fused = PackedAdam([("w", a)], torch.tensor([1e-3, 3e-2, 0.1]))
    plain = PackedAdam([("w", b)], torch.tensor([1e-3, 3e-2, 0.1]))
    plain.use_fused = False
    assert fused.use_fused or not hasattr(torch, "_fused_adam_")
    for i in range(10):
        g = torch.randn(3, 5, 4)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step(0.5 + i / 20)
        plain.step(0.5 + i / 20)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)
    assert all(math.isfinite(v) for v in a.detach().flatten().tolist())
