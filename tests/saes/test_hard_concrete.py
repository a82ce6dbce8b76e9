"""Hard-concrete gates and the hard-concrete SAE against closed forms."""

import math

import pytest
import torch
from sae_helpers import make, set_params

from saesweep.saes.hard_concrete import beta_at, eval_gates, expected_l0, sample_gates


def test_hard_concrete_eval_gates_exact_zero_and_one():
    # zero where sigmoid(a) <= 1/12 (a <= log(1/11) = -2.398), one where sigmoid(a) >= 11/12
    log_alpha = torch.tensor([-2.5, -2.39, 0.0, 2.39, 2.5])
    z = eval_gates(log_alpha)
    assert z[0].item() == 0.0 and z[4].item() == 1.0
    assert 0.0 < z[1].item() < 0.01 and 0.99 < z[3].item() < 1.0
    assert z[2].item() == pytest.approx(0.5)  # 0.5 * 1.2 - 0.1

def test_hard_concrete_penalty_closed_form():
    log_alpha = torch.tensor([[[0.0, 1.0]]])  # [n=1, B=1, m=2]
    beta = torch.tensor([0.5])
    # sigmoid(a - 0.5 log(0.1/1.1)) = sigmoid(a + 1.198948)
    expected = 1 / (1 + math.exp(-1.198948)) + 1 / (1 + math.exp(-2.198948))
    assert expected_l0(log_alpha, beta).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(1.668498, rel=1e-5)

def test_hard_concrete_samples_match_their_expected_l0():
    torch.manual_seed(0)
    log_alpha = torch.linspace(-3, 3, 7).expand(1, 200_000, 7).contiguous()
    beta = torch.tensor([0.7])
    z = sample_gates(log_alpha, beta, [torch.Generator().manual_seed(1)])
    assert ((z >= 0) & (z <= 1)).all()
    nonzero = (z > 0).float().mean(1)[0]
    expected = torch.sigmoid(log_alpha[0, 0] - 0.7 * math.log(0.1 / 1.1))
    assert torch.allclose(nonzero, expected, atol=5e-3)
    assert (z == 1).any() and (z == 0).any()  # the stretch makes exact 0 and 1 reachable

def test_hard_concrete_sae_eval_codes_use_deterministic_gates():
    sae = make("hard_concrete", 2, 2, sparsity_coeff=0.1, initial_beta=0.5, input_dependent_gates=False)
    set_params(sae, W_mag=[[1, 0], [0, 1]], b_mag=[0, 0], W_dec=[[1, 0], [0, 1]], b_dec=[0, 0], log_alpha=[-3.0, 3.0])
    x = torch.tensor([[2.0, 2.0]])
    assert torch.equal(sae.encode(x)[0], torch.tensor([[0.0, 2.0]]))  # gate 0 closed, gate 1 fully open
    assert torch.equal(sae.encode(x)[0], sae.encode(x)[0])
    L = sae.losses(x)
    expected = torch.sigmoid(torch.tensor([-3.0, 3.0]) + 0.5 * 2.397895).sum()
    assert L.sparsity.item() == pytest.approx(expected.item(), rel=1e-5)

def test_input_dependent_gates_shapes_and_types():
    dep = make("hard_concrete", 4, 8, sparsity_coeff=0.1, initial_beta=0.5, input_dependent_gates=True)
    shared = make("hard_concrete", 4, 8, sparsity_coeff=0.1, initial_beta=0.5, input_dependent_gates=False)
    assert dep.W_gate.shape == (1, 4, 8) and not hasattr(shared, "W_gate")
    assert shared.log_alpha.shape == (1, 8)

def test_beta_annealing_is_exponential():
    init, final = torch.tensor([0.5]), torch.tensor([0.1])
    assert beta_at(init, final, 0.0).item() == pytest.approx(0.5)
    assert beta_at(init, final, 1.0).item() == pytest.approx(0.1)
    assert beta_at(init, final, 0.5).item() == pytest.approx(math.sqrt(0.05))
