"""Loading exported SAEs (folders written by :mod:`saesweep.sae_files`), here and in SAELens.

Every type loads with :func:`load_sae` (one SAE, shaped as in SAELens) or :func:`load_sae_pack`
(the one-member pack the trainer uses), and with ``sae_lens.SAE.load_from_disk``: ReLU, gated,
TopK and JumpReLU as SAELens's own ``standard``, ``gated``, ``topk`` and ``jumprelu``
architectures, BatchTopK and Matryoshka as ``jumprelu``; for the two hard-concrete types,
call :func:`register_saelens` once first: it registers SAELens classes for them
(:mod:`saesweep.saelens_classes`). Importing this module changes nothing outside it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from saesweep import saes
from saesweep.sae_files import CFG_FILE, WEIGHTS_FILE, export_member, saelens_cfg  # noqa: F401  (the writers)


def _type_of_architecture(architecture: str) -> str:
    """The sae_type whose SAELens ``architecture`` name this is."""
    for name in saes.names():
        if saes.get(name).saelens_architecture == architecture:
            return name
    raise ValueError(f"no saesweep SAE type exports the SAELens architecture {architecture!r}")


class SAE(torch.nn.Module):
    """One trained SAE (any saesweep type) on raw activations, shaped as in SAELens:
    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``encode(x) -> [..., d_sae]``,
    ``decode(f) -> [..., d_in]``, ``forward(x) = decode(encode(x))``. Evaluation-mode codes
    (deterministic hard-concrete gates). ``pack`` is the underlying one-member pack."""

    def __init__(self, pack: saes.PackedSAE, cfg: dict[str, Any]) -> None:
        super().__init__()
        if pack.n != 1:
            raise ValueError(f"an SAE is a pack of one, got {pack.n} members")
        self.pack = pack
        self.cfg = cfg
        self.sae_type = pack.name
        self.d_in, self.d_sae = pack.d_in, pack.d_sae

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pack = super().__getattr__("pack")
            if name in pack._parameters:
                return pack._parameters[name].detach()[0]
            raise

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        f = self.pack.encode(x.reshape(-1, shape[-1]).to(self.pack.W_dec), train=False)[0]
        return f.reshape(*shape[:-1], self.d_sae)

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        shape = f.shape
        x_hat = self.pack.decode(f.reshape(1, -1, shape[-1]).to(self.pack.W_dec))[0]
        return x_hat.reshape(*shape[:-1], self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load_sae(folder: str | Path, device: str = "cpu") -> SAE:
    """Load an exported SAE (any saesweep type) taking raw activations (see :class:`SAE`)."""
    folder = Path(folder)
    return SAE(load_sae_pack(folder, device), json.loads((folder / CFG_FILE).read_text()))


def load_sae_pack(folder: str | Path, device: str = "cpu") -> saes.PackedSAE:
    """Load an exported SAE (any saesweep type) as a one-member pack taking raw activations.
    Weights that do not match the checksum written with them raise :class:`~saesweep.io.CorruptFile`."""
    from saesweep.io import load_tensors

    folder = Path(folder)
    cfg = json.loads((folder / CFG_FILE).read_text())
    sae_type = cfg.get("metadata", {}).get("sae_type") or _type_of_architecture(cfg["architecture"])
    cls = saes.get(sae_type)
    hp = {k: v for k, v in cfg.get("metadata", {}).get("hyperparameters", {}).items() if k != "lr"}
    sae = cls(cfg["d_in"], cfg["d_sae"], [hp], [0], device=device)
    sae.load_member_state(load_tensors(folder / WEIGHTS_FILE, device=device)[0])
    return sae


def register_saelens() -> bool:
    """Register the hard-concrete types with SAELens (idempotent); False without sae_lens."""
    if importlib.util.find_spec("sae_lens") is None:
        return False
    from saesweep import saelens_classes

    saelens_classes.register()
    return True
