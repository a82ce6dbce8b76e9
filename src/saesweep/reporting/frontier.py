"""The Pareto frontier of a sweep's trials: which trials no other beats on two metrics at once
(the directions come from the metric registry), per SAE type or over all of them."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from saesweep import metric_registry as metrics

#: the results column of a sweep over hooks: activations of different layers are not compared
HOOK_AXIS = "source.hook"

#: an SAE is degenerate (not worth reading as a result) when its codes are dense or most of
#: its dictionary is dead
DENSE_L0_FRACTION = 0.5
DEAD_FRACTION_LIMIT = 0.5
#: ... or its codes far sparser than the source's true features (a synthetic source knows them)
SPARSE_L0_FRACTION = 0.25


def degenerate_reason(row: Any) -> str:
    """Why a complete trial's SAE is degenerate ('' when it is not): L0 above half the
    dictionary or above d_in (dense codes), L0 below a quarter of a synthetic source's true L0,
    or more than half of the features dead."""
    get = row.get
    l0, dead, d_in, d_sae = get("l0"), get("dead_fraction"), get("d_in"), get("d_sae")
    reasons = []
    if _num(l0) and _num(d_sae) and l0 > DENSE_L0_FRACTION * d_sae:
        reasons.append(f"dense: L0 {l0:.0f} > half of {d_sae:.0f} features")
    elif _num(l0) and _num(d_in) and l0 > d_in:
        reasons.append(f"dense: L0 {l0:.0f} > d_in {d_in:.0f}")
    true_l0 = get("true_l0")
    if _num(l0) and _num(true_l0) and l0 < SPARSE_L0_FRACTION * true_l0:
        reasons.append(f"too sparse: L0 {l0:.2g} < a quarter of the source's true L0 {true_l0:.2g}")
    if _num(dead) and dead > DEAD_FRACTION_LIMIT:
        reasons.append(f"{dead:.0%} of features dead")
    return "; ".join(reasons)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and v == v


def pareto_mask(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Which rows of ``points`` (n x k) no other row dominates, for per-column directions.

    A row dominates another when it is at least as good in every column and better in one;
    rows with a non-finite value are never on the frontier.
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or len(pts) == 0:
        return np.zeros(len(pts), dtype=bool)
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    p = pts * sign  # now lower is better everywhere
    ok = np.isfinite(p).all(axis=1)
    mask = ok.copy()
    idx = np.flatnonzero(ok)
    q = p[idx]
    for j, i in enumerate(idx):
        le = (q <= q[j]).all(axis=1)
        lt = (q < q[j]).any(axis=1)
        if (le & lt).any():
            mask[i] = False
    return mask


def frontier_ids(df, x: str = "l0", y: str = "fvu", *, by_type: bool = False, degenerate: bool = False) -> Any:
    """Trial ids on the (x, y) Pareto frontier of the complete trials (directions from the
    metrics); degenerate SAEs (:func:`degenerate_reason`) are left off unless ``degenerate``.

    With ``by_type`` a dict ``{series: [ids]}`` (series: the SAE type, or type @ hook in a sweep
    over hooks, see :func:`~saesweep.reporting.table.series_labels`); otherwise one list over
    all types, and in a sweep over hooks the union of each hook's frontier (activations of
    different layers are not compared). Ids are ordered by ``x`` (per hook).
    """
    if df is None or len(df) == 0 or x not in df or y not in df:
        return {} if by_type else []
    d = df[(df["state"] == "complete")] if "state" in df else df
    d = d[np.isfinite(d[x].astype(float)) & np.isfinite(d[y].astype(float))]
    if not degenerate and len(d):
        d = d[[not degenerate_reason(r) for _, r in d.iterrows()]]
    dirs = [metrics.direction(x), metrics.direction(y)]
    if by_type:
        return {t: _frontier(g, x, y, dirs) for t, g in d.groupby(series_of(d), sort=False)}
    return [i for _, g in rows_by_hook(d) for i in _frontier(g, x, y, dirs)]


def series_of(d) -> Any:
    return d["series"] if "series" in d else d["sae_type"]


def rows_by_hook(d) -> list[tuple[Optional[str], Any]]:
    """``[(hook, rows)]`` in a sweep over hooks, else ``[(None, d)]``."""
    if HOOK_AXIS in d and d[HOOK_AXIS].nunique(dropna=True) > 1:
        return list(d.groupby(d[HOOK_AXIS].fillna("?"), sort=False))
    return [(None, d)]


def _frontier(d, x, y, dirs) -> list[str]:
    if len(d) == 0:
        return []
    mask = pareto_mask(d[[x, y]].to_numpy(dtype=float), dirs)
    f = d[mask].sort_values([x, y])
    return list(f["trial_id"])

