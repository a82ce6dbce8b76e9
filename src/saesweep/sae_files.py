"""The SAELens folder format, written: ``sae_weights.safetensors`` (weights taking raw
activations: the normalisation scale is folded in, see ``PackedSAE.member_state``) and
``cfg.json`` (SAELens's config plus saesweep's metadata). Reading, and SAELens classes for the
types it lacks, are in :mod:`saesweep.export`; this module does not import sae_lens, so a
worker that saves SAEs never pays for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saesweep import saes
from saesweep.version import __version__
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
    meta.update(sae.export_metadata(i))
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
