"""Every metric a trial reports, in one table: its name, whether lower or higher is better, its
label in plots, and where it is computed. The report's table and plots, search objectives,
``saesweep importance`` and W&B sweeps, and pruning read it from here (torch-free).

Adding a metric is one :class:`Metric` entry here plus its computation in the module its
``computed_in`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class Metric:
    name: str
    #: which way is better; None for run statistics that are not objectives
    direction: Optional[Direction]
    label: str
    #: the module that computes it
    computed_in: str
    #: shown in the report's trial table
    in_table: bool = True
    #: the training-log value pruning follows for this objective (lower is better)
    intermediate: str = "mse"


_RECON = "saesweep.metrics.reconstruction"
_DOWN = "saesweep.metrics.downstream"
_RECOV = "saesweep.metrics.recovery"
_RUN = "saesweep.training.run"

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("feature_f1", "maximize", "feature F1 (matched latent fires when the true feature is active)", _RECOV),
    Metric("fvu", "minimize", "FVU (fraction of variance unexplained)", _RECON),
    Metric("l0", "minimize", "L0 (active features per token)", _RECON, intermediate="l0"),
    Metric("ce_loss_score", "maximize", "CE loss score (SAEBench)", _DOWN),
    Metric("kl_div_score", "maximize", "KL divergence score (SAEBench)", _DOWN),
    Metric("kl", "minimize", "KL(clean || spliced) per token", _DOWN),
    Metric("explained_variance", "maximize", "explained variance (1 - FVU)", _RECON),
    Metric("dead_fraction", "minimize", "dead features (share)", _RECON),
    Metric("absorption", "minimize", "absorption (parent's latent silent where a child fires)", _RECOV),
    Metric("feature_mcc", "maximize", "feature MCC (matched latent vs true feature)", _RECOV),
    Metric("frac_f1_50", "maximize", "true features with F1 >= 0.5 (share)", _RECOV),
    Metric("feature_f1_greedy", "maximize", "feature F1, greedy best-cosine matching", _RECOV, in_table=False),
    Metric("true_l0", None, "the source's true mean L0", _RECOV, in_table=False),
    Metric("probe_f1", None, "supervised linear probe F1 (the world's ceiling)", _RECOV, in_table=False),
    Metric("decoder_mmcs", "maximize", "decoder MMCS (best cosine per true feature)", _RECOV, in_table=False),
    Metric("decoder_frac_cos90", "maximize", "true features with a decoder row at cosine > 0.9", _RECOV,
           in_table=False),
    Metric("mse", "minimize", "MSE per dimension (normalised activations)", _RECON, in_table=False),
    Metric("l1", "minimize", "L1 of the codes per token", _RECON, in_table=False, intermediate="sparsity"),
    Metric("ce_sae", "minimize", "CE with the SAE spliced in", _DOWN, in_table=False),
    Metric("ce_tokens", None, "held-out predictions the CE/KL metrics scored", _DOWN, in_table=False),
    Metric("cossim", "maximize", "cosine(x, x_hat)", _RECON, in_table=False),
    Metric("target_l0", None, "the L0 the trial was trained to reach (target_l0)", _RUN, in_table=False),
    Metric("l0_error", None, "held-out L0 / target_l0 - 1", _RUN),
    Metric("final_sparsity_coeff", None, "the sparsity coefficient the L0 controller ended with", _RUN,
           in_table=False),
    Metric("tokens_per_s", None, "training tokens per second of this SAE", _RUN),
    Metric("pack_tokens_per_s", None, "training tokens per second summed over the SAEs of its pack", _RUN),
    Metric("train_time_s", None, "training time (s)", _RUN),
)}


#: the random baselines (:mod:`saesweep.metrics.baselines`): name -> what it is
BASELINES = {
    "random_decoder": "random decoder, trained encoder",
    "random_firing": "random firing at the same L0",
    "pca": "PCA dictionary, top-k components",
    "true_dictionary": "true dictionary, trained encoder",
}


#: names earlier versions wrote, read as today's (old run folders and sweeps still load)
RENAMED = {"mmcs": "decoder_mmcs", "frac_recovered": "decoder_frac_cos90"}


def current_names(metrics: dict) -> dict:
    """``metrics`` with the names of earlier versions (:data:`RENAMED`) read as today's."""
    if not any(k in metrics for k in RENAMED):
        return metrics
    return {RENAMED.get(k, k): v for k, v in metrics.items() if not (k in RENAMED and RENAMED[k] in metrics)}


def objectives() -> list[str]:
    """Metrics a search can optimise (those with a direction)."""
    return [n for n, m in METRICS.items() if m.direction]


def direction(name: str) -> Direction:
    """``minimize`` or ``maximize``; ``ValueError`` naming the choices for anything else."""
    m = METRICS.get(name)
    if m is None or m.direction is None:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(objectives())}")
    return m.direction


def label(name: str) -> str:
    m = METRICS.get(name)
    return m.label if m else name


def table_metrics() -> list[str]:
    return [n for n, m in METRICS.items() if m.in_table]
