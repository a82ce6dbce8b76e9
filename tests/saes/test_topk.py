"""TopK SAE: the k largest pre-activations per token, per-member k, and the AuxK loss on
dead latents, against hand-computed values."""

import pytest
import torch

from saesweep import saes
from saesweep.saes.topk import keep_top


def test_keep_top_keeps_each_members_k_largest_through_a_relu():
    v = torch.tensor([[[3.0, -1.0, 2.0, 5.0]], [[3.0, -1.0, 2.0, 5.0]], [[-1.0, -2.0, 0.5, -3.0]]])
    out = keep_top(v, torch.tensor([2, 1, 3]))
    expected = torch.tensor([[[3.0, 0, 0, 5.0]], [[0, 0, 0, 5.0]], [[0, 0, 0.5, 0]]])
    torch.testing.assert_close(out, expected)


def hand_sae(k=(2,), **extra):
    """d 2, m 3: W_enc columns e0, e1, e0 + e1; decoder rows e0, e1, (e0 + e1)/sqrt 2; b = 0."""
    members = [{"k": kk, "auxk_coeff": 0.5, "k_aux": 1, "auxk_dead_tokens": 4, **extra} for kk in k]
    sae = saes.get("topk")(2, 3, members, list(range(len(k))))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 1], [0, 1, 1]]).expand_as(sae.W_enc))
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [2**-0.5, 2**-0.5]]).expand_as(sae.W_dec))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_codes_and_per_member_k():
    sae = hand_sae(k=(2, 1))
    x = torch.tensor([[1.0, 2.0]])  # pre = [1, 2, 3]
    f = sae.encode(x)
    torch.testing.assert_close(f, torch.tensor([[[0.0, 2, 3]], [[0.0, 0, 3]]]))
    assert sae.uses_sparsity_coeff is False


def test_auxk_loss_by_hand():
    sae = hand_sae(k=(1,))
    x = torch.tensor([[1.0, 2.0], [2.0, -1.0]])  # pre: [1, 2, 3] and [2, -1, 1]
    sae.since_fired.copy_(torch.tensor([[4.0, 0, 0]]))  # latent 0 dead (>= 4 tokens), 1 and 2 alive
    losses = sae.losses(x)
    # codes (k 1): token 0 -> latent 2 = 3; token 1 -> latent 0 = 2
    x_hat = torch.tensor([[3 * 2**-0.5, 3 * 2**-0.5], [2.0, 0.0]])
    e = x - x_hat
    # AuxK with k_aux 1 over the dead latent 0: a = ReLU(pre_0) = [1, 2]; e_hat = a * e0
    e_hat = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    expected = 0.5 * (e - e_hat).pow(2).sum(-1).mean()
    assert losses.aux.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.sparsity.item() == 0.0
    # the tracker: latents 0 and 2 fired in this batch (0 on token 1), latent 1 did not: +2 tokens
    torch.testing.assert_close(sae.since_fired, torch.tensor([[0.0, 2.0, 0.0]]))


def test_auxk_trains_only_through_dead_latents():
    sae = hand_sae(k=(1,))
    x = torch.tensor([[1.0, 2.0], [2.0, -1.0]])
    sae.since_fired.copy_(torch.tensor([[0.0, 4.0, 0]]))  # latent 1 dead; it never wins the top-1
    aux = sae._forward(x, train=True, progress=0.0).aux["auxk"]
    aux.sum().backward()
    g = sae.W_enc.grad[0]
    assert g[:, 1].abs().sum() > 0 and g[:, 0].abs().sum() == 0 and g[:, 2].abs().sum() == 0
    assert sae.W_dec.grad[0, 1].abs().sum() > 0 and sae.W_dec.grad[0, [0, 2]].abs().sum() == 0
