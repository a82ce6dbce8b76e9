"""Saving trained SAEs in the folder layout SAELens loads, and loading them back.

A folder holds ``sae_weights.safetensors`` and ``cfg.json``. Weights take raw (un-normalised)
activations: the normalisation scale is folded in (see ``PackedSAE.member_state``). ReLU and
gated SAEs use SAELens's ``standard`` and ``gated`` architectures and load with
``sae_lens.SAE.load_from_disk``; the hard-concrete types use the same layout under their own
architecture names and load with :func:`load_sae` here (one SAE, shaped as in SAELens) or
:func:`load_sae_pack` (the one-member pack the trainer uses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saesweep import __version__, saes
from saesweep.config.experiment import ExperimentConfig
from saesweep.io import atomic_save_tensors, atomic_write_json

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SAELENS_FORMAT_VERSION = "6.0.0"


def saelens_cfg(sae: saes.PackedSAE, i: int, config: ExperimentConfig) -> dict[str, Any]:
    src = config.source
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "saesweep_version": __version__,
        "trial_id": config.trial_id,
        "sae_type": config.sae_type,
        "hyperparameters": {"lr": config.lr, "dict_size_ratio": config.dict_size_ratio, **config.sae_hparams},
        "loss_convention": {
            "version": saes.LOSS_CONVENTION,
            "loss": "sum_d (x - x_hat)^2 + sparsity_coeff * penalty_scale * P + aux, each a mean over tokens",
            "penalty_scale": type(sae).penalty_scale,
            "normalisation": "trained on x * s with E||x s||^2 = 1; s is folded into these weights, which take raw activations",
        },
    }
    if src.kind == "hf":
        meta.update(
            model_name=src.model,
            hook_name=src.hook,
            hook_head_index=None,
            context_size=src.context_length,
            prepend_bos=src.prepend_bos,
            dataset_path=src.dataset,
        )
    else:
        meta.update(model_name=None, hook_name=None, dataset_path=f"synthetic:{src.model_dump_json()}")
    return {
        "architecture": type(sae).saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_extra_cfg(i),
        "metadata": meta,
    }


def export_member(sae: saes.PackedSAE, i: int, config: ExperimentConfig, scale: float, folder: Path) -> None:
    """Write member ``i`` to ``folder`` (atomically, weights before cfg.json)."""
    folder = Path(folder)
    atomic_save_tensors(folder / WEIGHTS_FILE, sae.member_state(i, scale))
    atomic_write_json(folder / CFG_FILE, saelens_cfg(sae, i, config))


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
    """Load an exported SAE (any saesweep type) as a one-member pack taking raw activations."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / CFG_FILE).read_text())
    sae_type = cfg.get("metadata", {}).get("sae_type") or _type_of_architecture(cfg["architecture"])
    cls = saes.get(sae_type)
    hp = {k: v for k, v in cfg.get("metadata", {}).get("hyperparameters", {}).items() if k != "lr"}
    sae = cls(cfg["d_in"], cfg["d_sae"], [hp], [0], device=device)
    state = load_file(str(folder / WEIGHTS_FILE), device=device)
    with torch.no_grad():
        for name, p in sae.named_parameters(recurse=False):
            p.copy_(state[name].unsqueeze(0))
    return sae
