"""What every architecture shares: independent pack members, unit decoder rows, the loss convention."""

import pytest
import torch
from sae_helpers import make

from saesweep import saes


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
