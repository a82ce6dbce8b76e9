"""The ReLU SAE's loss against values computed by hand."""


import pytest
import torch
from sae_helpers import make, set_params


def test_relu_loss_by_hand():
    sae = make("relu", 2, 3, sparsity_coeff=0.2)
    set_params(
        sae,
        W_enc=[[1, 0, -1], [0, 1, 1]],
        b_enc=[0, -0.5, 0],
        W_dec=[[1, 0], [0, 1], [0.6, 0.8]],
        b_dec=[1, 0],
    )
    x = torch.tensor([[2.0, 1.0], [0.0, 2.0]])
    f = sae.encode(x)[0]
    assert torch.allclose(f, torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.5, 3.0]]))
    assert torch.allclose(sae.decode(f[None])[0], torch.tensor([[2.0, 0.5], [2.8, 3.9]]))
    L = sae.losses(x)
    # errors (0, .5) and (2.8, 1.9): SSE per token = (0.25 + 11.45) / 2 = 5.85 (MSE per element
    # 2.925); P = mean(1.5, 4.5) = 3; loss = SSE + c P (LOSS_CONVENTION 2, ReLU's penalty_scale 1)
    assert L.mse.item() == pytest.approx(2.925)
    assert L.sparsity.item() == pytest.approx(3.0)
    assert L.total.item() == pytest.approx(5.85 + 0.2 * 3.0)
    assert L.l0.item() == pytest.approx(2.0)
