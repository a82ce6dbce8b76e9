"""Every metric a trial reports, in one table: its name, whether lower or higher is better, its
label in plots, and where it is computed. The report's table and plots, search objectives,
``saesweep importance`` and W&B sweeps, and pruning read it from here (torch-free).

Adding a metric is one :class:`Metric` entry here plus its computation in the module its
``computed_in`` names. Every value a trial reports is registered here (run statistics too, with
no direction), and every registered value is computed: ``tests/metrics/test_registry.py``
checks both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Direction = Literal["minimize", "maximize"]
#: the values of ``train_log.jsonl`` an objective's pruning can follow (lower is better)
TRAIN_LOG_VALUES = ("mse", "l0", "sparsity", "loss")


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
    #: the training-log value pruning follows for this objective (lower is better): every
    #: metric with a direction names one, since pruning on it must follow something it chose
    intermediate: Optional[str] = None

    def __post_init__(self) -> None:
        if self.direction is not None and self.intermediate not in TRAIN_LOG_VALUES:
            raise ValueError(f"metric {self.name!r} is an objective: its intermediate must be one of "
                             f"{', '.join(TRAIN_LOG_VALUES)}, not {self.intermediate!r}")


_RECON = "saesweep.metrics.reconstruction"
_DOWN = "saesweep.metrics.downstream"
_RECOV = "saesweep.metrics.recovery"
_RUN = "saesweep.training.run"
_THRESH = "saesweep.saes.batchtopk"  # thresholded TopK types only (BatchTopK, Matryoshka)

METRICS: dict[str, Metric] = {m.name: m for m in (
    # objectives: pruning follows the training MSE unless the objective is the sparsity itself
    Metric("feature_f1", "maximize", "feature F1 (matched latent fires when the true feature is active)", _RECOV,
           intermediate="mse"),
    Metric("fvu", "minimize", "FVU (fraction of variance unexplained)", _RECON, intermediate="mse"),
    Metric("l0", "minimize", "L0 (active features per token)", _RECON, intermediate="l0"),
    Metric("ce_loss_score", "maximize", "CE loss score (SAEBench)", _DOWN, intermediate="mse"),
    Metric("kl_div_score", "maximize", "KL divergence score (SAEBench)", _DOWN, intermediate="mse"),
    Metric("kl", "minimize", "KL(clean || spliced) per token", _DOWN, intermediate="mse"),
    Metric("explained_variance", "maximize", "explained variance (1 - FVU)", _RECON, intermediate="mse"),
    Metric("dead_fraction", "minimize", "dead features (share)", _RECON, intermediate="mse"),
    Metric("absorption", "minimize", "absorption (parent's latent silent where a child fires)", _RECOV,
           intermediate="mse"),
    Metric("feature_mcc", "maximize", "feature MCC (matched latent vs true feature)", _RECOV, intermediate="mse"),
    Metric("frac_f1_50", "maximize", "true features with F1 >= 0.5 (share)", _RECOV, intermediate="mse"),
    Metric("feature_f1_greedy", "maximize", "feature F1, greedy best-cosine matching", _RECOV, in_table=False,
           intermediate="mse"),
    Metric("synthsaebench_f1", "maximize", "SynthSAEBench classification F1 (each latent vs its best |cos| "
           "feature, mean over latents)", _RECOV, intermediate="mse"),
    Metric("synthsaebench_precision", "maximize", "SynthSAEBench classification precision", _RECOV, in_table=False,
           intermediate="mse"),
    Metric("synthsaebench_recall", "maximize", "SynthSAEBench classification recall", _RECOV, in_table=False,
           intermediate="mse"),
    Metric("synthsaebench_uniqueness", "maximize", "SynthSAEBench feature uniqueness (distinct best features / "
           "latents)", _RECOV, in_table=False, intermediate="mse"),
    Metric("decoder_mmcs", "maximize", "decoder MMCS (best cosine per true feature)", _RECOV, in_table=False,
           intermediate="mse"),
    Metric("decoder_frac_cos90", "maximize", "true features with a decoder row at cosine > 0.9", _RECOV,
           in_table=False, intermediate="mse"),
    Metric("mse", "minimize", "MSE per dimension (normalised activations)", _RECON, in_table=False,
           intermediate="mse"),
    Metric("l1", "minimize", "L1 of the codes per token", _RECON, in_table=False, intermediate="sparsity"),
    Metric("ce_sae", "minimize", "CE with the SAE spliced in", _DOWN, in_table=False, intermediate="mse"),
    Metric("cossim", "maximize", "cosine(x, x_hat)", _RECON, in_table=False, intermediate="mse"),
    # measurements that are not objectives
    Metric("l2_ratio", None, "|x_hat| / |x| per token (below 1: shrinkage)", _RECON, in_table=False),
    Metric("true_l0", None, "the source's true mean L0", _RECOV, in_table=False),
    Metric("probe_f1", None, "supervised linear probe F1 (the world's ceiling)", _RECOV, in_table=False),
    Metric("ce_clean", None, "CE of the unedited model", _DOWN, in_table=False),
    Metric("ce_zero", None, "CE with the hooked activations zeroed", _DOWN, in_table=False),
    Metric("kl_zero", None, "KL(clean || zero-ablated) per token", _DOWN, in_table=False),
    Metric("ce_tokens", None, "held-out predictions the CE/KL metrics scored", _DOWN, in_table=False),
    Metric("target_l0", None, "the L0 the trial was trained to reach (target_l0)", _RUN, in_table=False),
    Metric("l0_error", None, "held-out L0 / target_l0 - 1", _RUN),
    Metric("final_sparsity_coeff", None, "the sparsity coefficient the L0 controller ended with", _RUN,
           in_table=False),
    Metric("threshold_calibrated", None, "inference threshold set so the held-out mean L0 is k", _THRESH,
           in_table=False),
    Metric("threshold_running", None, "the training's running estimate of the threshold", _THRESH, in_table=False),
    Metric("threshold_calibration_tokens", None, "held-out tokens the threshold was calibrated on", _THRESH,
           in_table=False),
    # run statistics
    Metric("tokens_per_s", None, "training tokens per second of this SAE", _RUN),
    Metric("pack_tokens_per_s", None, "training tokens per second summed over the SAEs of its pack", _RUN),
    Metric("train_time_s", None, "training time (s)", _RUN),
    Metric("eval_time_s", None, "evaluation time of the pack (s)", _RUN, in_table=False),
    Metric("data_time_s", None, "time spent waiting for activations (s)", _RUN, in_table=False),
    Metric("tokens", None, "training tokens seen", _RUN, in_table=False),
    Metric("pack_size", None, "SAEs trained together in the pack", _RUN, in_table=False),
    Metric("device", None, "the device that trained the pack", _RUN, in_table=False),
    Metric("dtype", None, "the training compute dtype", _RUN, in_table=False),
    Metric("resumed_from_step", None, "the checkpoint step training resumed from (0: none)", _RUN, in_table=False),
    Metric("d_in", None, "input width", _RUN, in_table=False),
    Metric("d_sae", None, "dictionary size", _RUN, in_table=False),
    Metric("resampled_features", None, "dead features resampled during training", _RUN, in_table=False),
)}


#: the random baselines (:mod:`saesweep.metrics.baselines`): name -> what it is
BASELINES = {
    "random_decoder": "random decoder, trained encoder",
    "random_firing": "random firing at the same L0",
    "pca": "PCA dictionary, top-k components",
    "true_dictionary": "true dictionary, trained encoder",
    "oracle": "true dictionary, true support",
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
