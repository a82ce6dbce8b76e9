"""Matryoshka BatchTopK: every nested prefix reconstructs on its own; group fractions checked."""

import pytest
import torch

from saesweep import saes
from saesweep.saes.hparam_types import parse_fractions


def test_prefix_losses_by_hand():
    sae = saes.get("matryoshka")(2, 4, [{"k": 4, "auxk_coeff": 0.0, "group_fractions": "0.25,0.5,1"}], [0])
    assert sae.bounds == [0, 1, 2, 4]
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])[None])
        sae.b_dec.copy_(torch.tensor([[0.5, 0.0]]))
    x = torch.tensor([[2.0, 1.0]])
    f = torch.tensor([[[1.0, 0.5, 0.25, 0.25]]])
    # prefix 1: b_dec + 1 e0 = (1.5, 0): error (0.5, 1) -> 1.25; prefix 2: (1.5, 0.5): error (0.5, 0.5) -> 0.5
    assert sae.prefix_sse(x, f).item() == pytest.approx(1.75)


@pytest.mark.parametrize("bad", ["0.5,0.25,1", "0.5", "0,0.5,1", "a,b", "0.5,1.5"])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(ValueError, match="fractions"):
        parse_fractions(bad)
