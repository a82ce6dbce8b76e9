"""One-member SAEs with parameters set by hand, for the architecture tests."""

import torch

from saesweep import saes


def make(sae_type, d, m, **hp):
    return saes.get(sae_type)(d, m, [hp], [0])


def set_params(sae, **values):
    with torch.no_grad():
        for k, v in values.items():
            getattr(sae, k).copy_(torch.tensor(v, dtype=torch.float32).unsqueeze(0))
