"""The gated hard-concrete SAE's aux term."""


import pytest
import torch
from sae_helpers import make, set_params


def test_gated_hard_concrete_aux_leaves_decoder_gradient_untouched():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for aux in (0.0, 10.0):
        sae = make("gated_hard_concrete", 4, 8, sparsity_coeff=0.1, aux_coeff=aux, initial_beta=0.5)
        sae.losses(x).total.sum().backward()
        grads.append({k: p.grad.clone() for k, p in sae.named_parameters()})
    assert torch.equal(grads[0]["W_dec"], grads[1]["W_dec"])
    assert not torch.allclose(grads[0]["W_enc"], grads[1]["W_enc"])

def test_gated_hard_concrete_aux_is_the_gate_reconstruction_sse_over_d():
    sae = make("gated_hard_concrete", 2, 2, sparsity_coeff=0.1, aux_coeff=0.5, initial_beta=0.5)
    set_params(sae, W_dec=[[1, 0], [0, 1]], b_dec=[0, 0])
    x = torch.tensor([[1.0, 2.0]])
    z = torch.tensor([[[1.0, 0.5]]])
    # gate reconstruction (1, 0.5): SSE 2.25 per token, weighted aux_coeff / d = 0.25
    assert sae.aux_loss(x, z).item() == pytest.approx(0.25 * 2.25)
