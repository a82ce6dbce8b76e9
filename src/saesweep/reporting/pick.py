"""Which trial to take from a sweep: per SAE type (per series in a sweep over hooks), the knee of
its L0-FVU frontier, and at each L0 a user asks for, the best trial near that L0 by the sweep's
objective. Degenerate SAEs are never picked."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from saesweep import metric_registry as metrics
from saesweep.reporting.frontier import degenerate_reason, frontier_ids, series_of

#: a trial is "at" an asked L0 when its held-out L0 is within this factor of it
AT_L0_TOLERANCE = 0.25


def _usable(df: pd.DataFrame) -> pd.DataFrame:
    if not len(df) or "l0" not in df or "fvu" not in df:
        return df.iloc[0:0]
    d = df[df["state"] == "complete"] if "state" in df else df
    d = d[np.isfinite(d["l0"].astype(float)) & np.isfinite(d["fvu"].astype(float))]
    return d[[not degenerate_reason(r) for _, r in d.iterrows()]] if len(d) else d


def knee(points: np.ndarray) -> int:
    """Index of the knee of a frontier ``[[l0, fvu], ...]`` sorted by L0: the point farthest
    from the chord between its two ends, with log L0 and FVU each scaled to [0, 1]."""
    if len(points) <= 2:
        return len(points) - 1 if len(points) else 0
    x = np.log(np.maximum(points[:, 0], 1e-9))
    y = points[:, 1]
    x = (x - x.min()) / (np.ptp(x) or 1.0)
    y = (y - y.min()) / (np.ptp(y) or 1.0)
    a, b = np.array([x[0], y[0]]), np.array([x[-1], y[-1]])
    chord = b - a
    norm = float(np.hypot(*chord)) or 1.0
    dist = np.abs(chord[0] * (y - a[1]) - chord[1] * (x - a[0])) / norm
    return int(np.argmax(dist))


def lead_of(df: pd.DataFrame) -> Optional[str]:
    """The quality metric a pick is shown with beside L0 and FVU: the truth where the source
    knows it, else the downstream CE score."""
    for m in ("feature_f1", "ce_loss_score"):
        if m in df and df[m].notna().any():
            return m
    return None


def picks(df: pd.DataFrame, objective: str = "fvu", at_l0: Sequence[float] = ()) -> list[dict[str, Any]]:
    """One row per series and choice: ``{"series", "choice", "trial_id", "l0", "fvu", lead, "run_dir"}``
    (``choice``: ``"knee"`` or ``"L0 N"``); a row with ``"note"`` and no trial where a choice has
    no candidate."""
    d = _usable(df)
    if not len(d):
        return []
    lead = lead_of(d)
    direction = metrics.direction(objective)
    fronts = frontier_ids(d, "l0", "fvu", by_type=True)
    out: list[dict[str, Any]] = []

    def row(series: str, choice: str, r: pd.Series, why: str) -> dict[str, Any]:
        rec = {"series": series, "choice": choice, "why": why, "trial_id": r["trial_id"], "l0": float(r["l0"]),
               "fvu": float(r["fvu"]), "run_dir": r.get("run_dir")}
        if lead:
            rec[lead] = float(r[lead]) if pd.notna(r.get(lead)) else None
        return rec

    for series, g in d.groupby(series_of(d), sort=False):
        ids = fronts.get(series, [])
        if ids:
            f = g.set_index("trial_id").loc[ids].reset_index()
            i = knee(f[["l0", "fvu"]].to_numpy(dtype=float))
            out.append(row(series, "knee", f.iloc[i], f"knee of its L0-FVU frontier ({len(ids)} trials)"))
        for target in at_l0:
            ratio = np.abs(np.log(g["l0"].astype(float).clip(lower=1e-9) / target))
            near = g[ratio <= math.log(1 + AT_L0_TOLERANCE)]
            if not len(near) or objective not in near or not near[objective].notna().any():
                closest = g.iloc[int(np.argmin(ratio.to_numpy()))]
                out.append({"series": series, "choice": f"L0 {target:g}",
                            "note": f"no trial within {AT_L0_TOLERANCE:.0%} of L0 {target:g} (closest: "
                                    f"{closest['trial_id']} at L0 {float(closest['l0']):.3g})"})
                continue
            near = near[near[objective].notna()]
            best = near.loc[near[objective].idxmin() if direction == "minimize" else near[objective].idxmax()]
            out.append(row(series, f"L0 {target:g}", best,
                           f"best {objective} of {len(near)} trial(s) within {AT_L0_TOLERANCE:.0%} of L0 {target:g}"))
    return out


def snippet(run_dir: Optional[str]) -> str:
    """The line that loads a picked SAE."""
    return f'sae = saesweep.load_sae("{run_dir}")' if run_dir else ""


def pick_lines(df: pd.DataFrame, objective: str = "fvu", at_l0: Sequence[float] = ()) -> list[str]:
    """The picks for the end of a sweep."""
    rows = picks(df, objective, at_l0)
    if not rows:
        return []
    lead = next((m for m in ("feature_f1", "ce_loss_score") if any(m in r for r in rows)), None)  # as picks chose
    out = ["Pick (per type, degenerate SAEs left out; `saesweep report` shows the frontier around it):"]
    for r in rows:
        if "note" in r:
            out.append(f"  {r['series']} @ {r['choice']}: {r['note']}")
            continue
        extra = f", {lead} {r[lead]:.3f}" if lead and r.get(lead) is not None else ""
        out.append(f"  {r['series']}: {r['trial_id']}  L0 {r['l0']:.2f}, FVU {r['fvu']:.4f}{extra}  ({r['why']})")
        if r.get("run_dir"):
            out.append(f"    {snippet(r['run_dir'])}")
    return out
