"""Activation sources: ``synthetic`` (known ground truth) and ``hf`` (any Hugging Face causal LM)."""

from __future__ import annotations

import torch

from saesweep.config.experiment import ExperimentConfig
from saesweep.data.base import Activations, Reconstructor, norm_scale


def open_source(cfg: ExperimentConfig, device: torch.device | str = "cpu") -> Activations:
    """The activations an experiment trains and evaluates on (built or read from the cache)."""
    if cfg.source.kind == "synthetic":
        from saesweep.data.synthetic import SyntheticActivations

        return SyntheticActivations(cfg.source, cfg.eval.tokens)
    from saesweep.data.lm_activations import open_hf

    return open_hf(cfg, device=device)


__all__ = ["Activations", "Reconstructor", "norm_scale", "open_source"]
