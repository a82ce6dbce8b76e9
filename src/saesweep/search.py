"""Search spaces for the store: which values each swept parameter can take.

Grid trials record their parameters with a categorical distribution over the grid's values,
so Optuna's importance evaluators and dashboard see the real search space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from .config import ExperimentConfig
from .grid import Range, SweepSpec, swept_params

VARIED_FIELDS = ("lr", "dict_size_ratio", "sparsity_coeff", "aux_coeff", "initial_beta", "final_beta", "input_dependent_gates")


def distribution(space: Any) -> BaseDistribution:
    if isinstance(space, Range):
        return FloatDistribution(space.low, space.high, log=space.log)
    return CategoricalDistribution(list(space))


def grid_spaces(spec: SweepSpec, configs: Sequence[ExperimentConfig]) -> tuple[list[dict], list[dict]]:
    """(params, distributions) per config of a grid sweep."""
    params, spaces = [], []
    for cfg in configs:
        params.append(swept_params(spec, cfg))
        spaces.append({p: distribution(spec.grids[cfg.sae_type][p]) for p in params[-1]})
    return params, spaces


def inferred_spaces(configs: Sequence[ExperimentConfig]) -> tuple[list[dict], list[dict]]:
    """(params, distributions) for configs from files: the values seen per type and field."""
    seen: dict[tuple[str, str], list] = {}
    for cfg in configs:
        for f in VARIED_FIELDS:
            v = getattr(cfg, f, None)
            if v is not None:
                vals = seen.setdefault((cfg.sae_type, f), [])
                if v not in vals:
                    vals.append(v)
    params, spaces = [], []
    for cfg in configs:
        p = {f: getattr(cfg, f) for f in VARIED_FIELDS if getattr(cfg, f, None) is not None}
        params.append(p)
        spaces.append({f: CategoricalDistribution(sorted(seen[(cfg.sae_type, f)], key=_order)) for f in p})
    return params, spaces


def _order(v: Any):
    return (str(type(v)), v)


# ------------------------------------------------------------ sampled search (issue 6)
def ask_trials(store, spec: SweepSpec, worker: str, max_n: int) -> list:
    """New RUNNING trials sampled by the spec's sampler (random/TPE), within the budget.

    Returns claims owned by ``worker``; empty once the budget is spent.
    """
    raise NotImplementedError("random/tpe search is not implemented yet")


def pruning_callback(store, spec: SweepSpec, claims: Sequence) -> Callable[[ExperimentConfig, dict], bool]:
    """A ``should_prune(config, log_record)`` for the trainer, backed by the spec's Optuna pruner."""
    raise NotImplementedError("pruning is not implemented yet")
