"""Hyperparameter importance per SAE type for a chosen metric, with Optuna's evaluators.

For each SAE type, the COMPLETE trials of that type are copied into an in-memory Optuna study
(value = the chosen metric, direction = the metric's) and an importance evaluator ranks the
parameters that vary among them. Evaluators:

* ``ped-anova`` -- Optuna's default (PED-ANOVA); no extra dependency;
* ``fanova`` -- fANOVA with a random forest (needs scikit-learn);
* ``mdi`` -- mean decrease in impurity of a random forest (needs scikit-learn);
* ``auto`` -- fANOVA when scikit-learn is installed, else PED-ANOVA.

Importances need at least ``MIN_TRIALS`` complete trials with the metric and at least two
parameters that take several values; a type short of that gets a ``status`` saying why.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from saesweep.errors import ConfigError
from saesweep import metric_registry as metrics

MIN_TRIALS = 8
EVALUATORS = ("auto", "ped-anova", "fanova", "mdi")


def _has_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def make_evaluator(name: str = "auto", seed: int = 0):
    """(evaluator, its name) for ``name`` (see the module docstring)."""
    import optuna

    if name not in EVALUATORS:
        raise ConfigError(f"--evaluator {name}: choose from {', '.join(EVALUATORS)}")
    if name == "auto":
        name = "fanova" if _has_sklearn() else "ped-anova"
    if name in ("fanova", "mdi") and not _has_sklearn():
        raise ConfigError(f"--evaluator {name} needs scikit-learn (pip install scikit-learn); "
                          "or use --evaluator ped-anova")
    if name == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=seed), name
    if name == "mdi":
        return optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed), name
    return optuna.importance.PedAnovaImportanceEvaluator(), name


def param_importances(store, metric: Optional[str] = None, *, evaluator: str = "auto",
                      sae_types: Optional[Sequence[str]] = None, seed: int = 0) -> dict[str, Any]:
    """Importances of each SAE type's parameters for ``metric`` (default: the sweep's first objective).

    Returns ``{"metric", "direction", "evaluator", "min_trials", "by_type": {type: {"status":
    "ok" | "insufficient", "n_trials", "params": [varying params], "importances": {param: share},
    "reason"?}}}``; the shares of a type sum to 1.
    """
    from saesweep.sweep.store import COMPLETE

    metric = metric or (store.info.get("objectives") or ["fvu"])[0]
    if metric not in metrics.objectives():
        raise ConfigError(f"--metric {metric}: choose from {', '.join(metrics.objectives())}")
    ev, ev_name = make_evaluator(evaluator, seed)
    by_type: dict[str, list] = {}
    for t in store.trials([COMPLETE]):
        by_type.setdefault(t.user_attrs.get("sae_type", "?"), []).append(t)
    types = list(sae_types) if sae_types else list(by_type)
    out: dict[str, Any] = {"metric": metric, "direction": metrics.direction(metric), "evaluator": ev_name,
                           "min_trials": MIN_TRIALS, "by_type": {}}
    for sae_type in types:
        out["by_type"][sae_type] = _for_type(by_type.get(sae_type, []), metric, ev)
    return out


def _for_type(trials, metric: str, evaluator) -> dict[str, Any]:
    import optuna

    rows = []
    for t in trials:
        v = (t.user_attrs.get("metrics") or {}).get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            rows.append((t, float(v)))
    res: dict[str, Any] = {"n_trials": len(rows), "importances": {}, "params": []}
    if len(rows) < MIN_TRIALS:
        return {**res, "status": "insufficient",
                "reason": f"{len(rows)} complete trial(s) with {metric}; importance needs at least {MIN_TRIALS}"}
    # the parameters that vary, with one distribution shared by every trial
    names = set.intersection(*(set(t.params) for t, _ in rows))
    varying = []
    for p in sorted(names):
        dists = {repr(t.distributions.get(p)) for t, _ in rows}
        values = {repr(t.params[p]) for t, _ in rows}
        if len(values) > 1 and len(dists) == 1:
            varying.append(p)
    res["params"] = varying
    if len(varying) < 2:
        return {**res, "status": "insufficient",
                "reason": f"{len(varying)} parameter(s) vary among these trials ({', '.join(varying) or 'none'}); "
                          "importance needs at least 2"}
    study = optuna.create_study(direction=metrics.direction(metric), storage=optuna.storages.InMemoryStorage())
    for t, v in rows:
        study.add_trial(optuna.trial.create_trial(
            value=v, params={p: t.params[p] for p in varying}, distributions={p: t.distributions[p] for p in varying}))
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
    except Exception as e:  # e.g. an evaluator that cannot split these values
        return {**res, "status": "insufficient", "reason": f"the evaluator failed: {type(e).__name__}: {e}"}
    res["importances"] = {p: float(v) for p, v in imp.items()}
    return {**res, "status": "ok"}
