"""Activation sources: ``synthetic`` (known ground truth) and ``hf`` (any Hugging Face causal LM)."""

from __future__ import annotations

from typing import Sequence

import torch

from saesweep.config.experiment import ExperimentConfig
from saesweep.data.base import Activations, Reconstructor, norm_scale


def open_source(cfg: ExperimentConfig, device: torch.device | str = "cpu", hooks: Sequence[str] = ()) -> Activations:
    """The activations an experiment trains and evaluates on (built or read from the cache).

    ``hooks``: other hook points of the same model and data that will be wanted too (a sweep
    over layers); when ``cfg``'s cache entry has to be built, theirs are filled by the same LM
    pass."""
    if cfg.source.kind == "synthetic":
        from saesweep.data.synthetic import SyntheticActivations

        return SyntheticActivations(cfg.source, cfg.eval.tokens)
    from saesweep.data.lm_activations import open_hf

    return open_hf(cfg, device=device, hooks=hooks)


__all__ = ["Activations", "Reconstructor", "norm_scale", "open_source"]
