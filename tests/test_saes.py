"""Each architecture's forward pass and loss against values computed by hand."""

import math

import pytest
import torch

from saesweep import saes
from saesweep.saes.hard_concrete import beta_at, eval_gates, expected_l0, sample_gates


def make(sae_type, d, m, **hp):
    return saes.get(sae_type)(d, m, [hp], [0])


def set_params(sae, **values):
    with torch.no_grad():
        for k, v in values.items():
            getattr(sae, k).copy_(torch.tensor(v, dtype=torch.float32).unsqueeze(0))


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


def test_gated_hard_concrete_aux_leaves_decoder_gradient_untouched():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for aux in (0.0, 10.0):
        sae = make("gated_hard_concrete", 4, 8, sparsity_coeff=0.1, aux_coeff=aux, initial_beta=0.5)
        sae.losses(x).total.sum().backward()
        grads.append({k: p.grad.clone() for k, p in sae.named_parameters()})
    assert torch.equal(grads[0]["W_dec"], grads[1]["W_dec"])
    assert not torch.allclose(grads[0]["W_enc"], grads[1]["W_enc"])


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


@pytest.mark.parametrize("sae_type", saes.names())
def test_members_are_independent(sae_type):
    """A member's loss and gradient do not depend on the other members of its pack."""
    hp = dict(sparsity_coeff=0.1, initial_beta=0.5, aux_coeff=0.1, input_dependent_gates=True)
    own = saes.get(sae_type).hyperparams
    hp = {k: v for k, v in hp.items() if k in own or k == "sparsity_coeff"}
    x = torch.randn(32, 6)
    pack = saes.get(sae_type)(6, 12, [hp, {**hp, "sparsity_coeff": 0.5}], [3, 4])
    single = saes.get(sae_type)(6, 12, [{**hp, "sparsity_coeff": 0.5}], [4])
    Lp, Ls = pack.losses(x, progress=0.3), single.losses(x, progress=0.3)
    assert torch.allclose(Lp.total[1], Ls.total[0], rtol=1e-5, atol=1e-6)
    Lp.total.sum().backward()
    Ls.total.sum().backward()
    for (k, p), (_, q) in zip(pack.named_parameters(), single.named_parameters()):
        assert torch.allclose(p.grad[1], q.grad[0], rtol=1e-4, atol=1e-6), k


def test_decoder_rows_stay_unit_norm_and_select_drops_members():
    sae = make("relu", 4, 8, sparsity_coeff=0.1)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(1, 8))
    pack = saes.get("relu")(4, 8, [dict(sparsity_coeff=s) for s in (0.1, 0.2, 0.3)], [0, 1, 2])
    w2 = pack.W_enc[2].clone()
    pack.select([0, 2])
    assert pack.n == 2 and torch.equal(pack.W_enc[1], w2)
    assert pack.sparsity_coeff.tolist() == pytest.approx([0.1, 0.3])


def test_loss_convention_weights_by_hand():
    """SSE + sparsity_coeff * penalty_scale * P + aux (LOSS_CONVENTION 2): penalty_scale is 1
    for ReLU's L1, 2 for the gated gate pre-activations, 0.1 for the expected-L0 counts."""
    mse, P, aux = torch.tensor([0.5]), torch.tensor([3.0]), torch.tensor([0.25])
    for sae_type, scale, hp in (("relu", 1.0, {}), ("gated", 2.0, {"aux_coeff": 1.0}),
                                ("hard_concrete", 0.1, {"initial_beta": 0.5}),
                                ("gated_hard_concrete", 0.1, {"aux_coeff": 1.0, "initial_beta": 0.5})):
        sae = make(sae_type, 2, 4, sparsity_coeff=0.2, **hp)
        assert sae.total_loss(mse, P, aux).item() == pytest.approx(0.5 * 2 + 0.2 * scale * 3.0 + 0.25)
        # the sparsity warm-up scales the penalty only
        assert sae.total_loss(mse, P, aux, 0.5).item() == pytest.approx(0.5 * 2 + 0.1 * scale * 3.0 + 0.25)


def test_gated_hard_concrete_aux_is_the_gate_reconstruction_sse_over_d():
    sae = make("gated_hard_concrete", 2, 2, sparsity_coeff=0.1, aux_coeff=0.5, initial_beta=0.5)
    set_params(sae, W_dec=[[1, 0], [0, 1]], b_dec=[0, 0])
    x = torch.tensor([[1.0, 2.0]])
    z = torch.tensor([[[1.0, 0.5]]])
    # gate reconstruction (1, 0.5): SSE 2.25 per token, weighted aux_coeff / d = 0.25
    assert sae.aux_loss(x, z).item() == pytest.approx(0.25 * 2.25)
