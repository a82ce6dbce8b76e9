"""JumpReLU SAE: codes, the L0 penalty and the straight-through pseudo-derivatives by hand,
and equal to SAELens's own JumpReLU and Step functions."""

import pytest
import torch

from saesweep import saes
from saesweep.saes.jumprelu import JumpFn


def test_forward_and_pseudo_derivatives_by_hand():
    pre = torch.tensor([[[0.6, 1.2, 1.6, 3.0]]], requires_grad=True)
    theta = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]], requires_grad=True)
    eps = torch.tensor([[[1.0]]])
    gate, f = JumpFn.apply(pre, theta, eps)
    torch.testing.assert_close(gate, torch.tensor([[[0.0, 1, 1, 1]]]))
    torch.testing.assert_close(f, torch.tensor([[[0.0, 1.2, 1.6, 3.0]]]))
    # L = sum(gate) + sum(2 f): kernel 1/eps where |pre - theta| < eps/2: latents 0 (-0.4) and 1 (0.2)
    (gate.sum() + 2 * f.sum()).backward()
    torch.testing.assert_close(pre.grad, torch.tensor([[[0.0, 2.0, 2.0, 2.0]]]))
    # d/dtheta: -(1/eps)K * 1 - (theta/eps)K * 2 = -3 where K = 1
    torch.testing.assert_close(theta.grad, torch.tensor([[[-3.0, -3.0, 0.0, 0.0]]]))


def test_equals_saelens_functions():
    jr = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 8, generator=g).abs()
    theta = torch.rand(8, generator=g) * 0.5 + 0.2
    w_gate, w_f = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    bw = 0.3
    a_pre, a_th = pre.clone().requires_grad_(), theta.clone().requires_grad_()
    gate, f = JumpFn.apply(a_pre[None], a_th[None, None], torch.tensor([[[bw]]]))
    ((gate[0] * w_gate).sum() + (f[0] * w_f).sum()).backward()
    b_pre, b_th = pre.clone().requires_grad_(), theta.clone().requires_grad_()
    gate2 = jr.Step.apply(b_pre, b_th, bw, False)
    f2 = jr.JumpReLU.apply(b_pre, b_th, bw, False)
    ((gate2 * w_gate).sum() + (f2 * w_f).sum()).backward()
    torch.testing.assert_close(f[0], f2)
    torch.testing.assert_close(a_pre.grad, b_pre.grad)
    torch.testing.assert_close(a_th.grad, b_th.grad)


def test_penalty_is_the_l0_and_the_threshold_is_exported():
    sae = saes.get("jumprelu")(2, 2, [{"sparsity_coeff": 0.1, "jumprelu_init_threshold": 0.5}], [0])
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2)[None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.2], [0.7, 0.9]])
    step = sae._forward(x, train=True, progress=0.0)
    f, penalty = step.codes, step.penalty
    torch.testing.assert_close(f[0], torch.tensor([[1.0, 0.0], [0.7, 0.9]]))
    assert penalty.item() == pytest.approx(1.5)  # (1 + 2) / 2 tokens
    torch.testing.assert_close(sae.member_state(0)["threshold"], torch.tensor([0.5, 0.5]))


def test_a_resampled_latent_starts_at_the_initial_threshold():
    from saesweep.training.resample import resample_member

    sae = saes.get("jumprelu")(4, 8, [{"sparsity_coeff": 0.1, "jumprelu_init_threshold": 0.01}], [0])
    with torch.no_grad():
        sae.b_enc[0, 3] = -100.0  # latent 3 never fires
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
    assert resample_member(sae, None, 0, x) >= 1
    assert sae.threshold[0, 3].item() == pytest.approx(0.01)


def test_thresholds_stay_at_or_above_zero_and_keep_learning():
    # Adam steps a threshold by about lr, more than it starts at: below zero it would hide behind
    # the clamp and never get a gradient again
    sae = saes.get("jumprelu")(4, 8, [{"sparsity_coeff": 0.0, "jumprelu_init_threshold": 0.001}], [0])
    with torch.no_grad():
        sae.threshold[0, :4] = -0.5  # as a step past zero would leave it
    sae.after_step()
    assert sae.threshold.min().item() == 0.0 and sae.threshold[0, 4:].tolist() == pytest.approx([0.001] * 4)
    # at zero, a latent whose pre-activations sit in the kernel's band still moves its threshold
    pre = torch.tensor([[[0.0002, 0.3]]])
    theta = sae.threshold.detach()[:, None, :2].clone().requires_grad_()
    gate, _ = JumpFn.apply(pre, theta.clamp_min(0), torch.tensor([[[0.001]]]))
    gate.sum().backward()
    assert theta.grad[0, 0, 0].item() < 0 and theta.grad[0, 0, 1].item() == 0
