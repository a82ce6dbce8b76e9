"""The gated SAE: loss by hand, and its aux term's gradients."""
import math

import pytest
import torch
from sae_helpers import make, set_params


def gated_example(aux_coeff=0.5):
    sae = make("gated", 2, 2, sparsity_coeff=0.1, aux_coeff=aux_coeff)
    set_params(
        sae,
        W_enc=[[1, 0], [0, 1]],
        W_dec=[[1, 0], [0, 1]],
        b_dec=[0, 0],
        b_gate=[0, -1],
        r_mag=[0, math.log(2)],
        b_mag=[0.5, 0],
    )
    return sae



def test_gated_loss_by_hand():
    sae = gated_example()
    x = torch.tensor([[1.0, 2.0]])
    # x_enc = (1, 2); pi_gate = (1, 1); f_mag = (1.5, 4); both gates open
    assert torch.allclose(sae.encode(x)[0], torch.tensor([[1.5, 4.0]]))
    L = sae.losses(x)
    assert L.mse.item() == pytest.approx((0.25 + 4.0) / 2)  # errors (0.5, 2): SSE 4.25
    assert L.sparsity.item() == pytest.approx(2.0)  # sum ReLU(pi_gate)
    assert L.aux.item() == pytest.approx(0.5 * (0 + 1))  # aux_coeff * SSE through the gates (1, 1)
    # SSE + c * penalty_scale (2 for gated) * P + aux
    assert L.total.item() == pytest.approx(4.25 + 0.1 * 2 * 2 + 0.5)
    # a closed gate zeroes the feature even with a positive magnitude
    x2 = torch.tensor([[-1.0, 3.0]])  # pi_gate = (-1, 2), f_mag = (0, 6)
    assert torch.allclose(sae.encode(x2)[0], torch.tensor([[0.0, 6.0]]))

def test_gated_aux_term_leaves_decoder_gradient_untouched():
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))  # seeded: an unlucky draw
    # can leave b_gate's gradient unchanged by aux (every open gate exactly reconstructed)
    grads = []
    for aux in (0.0, 10.0):
        sae = gated_example(aux_coeff=aux)
        sae.losses(x).total.sum().backward()
        grads.append({k: p.grad.clone() for k, p in sae.named_parameters()})
    # W_dec^sg: the decoder weights get exactly the same gradient with or without aux.
    # (b_dec still learns from aux through the encoder's input centering x - b_dec, as in
    # the paper and SAELens; only its use as the decoder's output bias is detached.)
    assert torch.equal(grads[0]["W_dec"], grads[1]["W_dec"])
    assert not torch.allclose(grads[0]["b_gate"], grads[1]["b_gate"])  # the gate path does learn from it
