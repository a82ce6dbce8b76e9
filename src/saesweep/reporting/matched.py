"""Architectures compared at matched sparsity: the trials of a sweep trained to a ``target_l0``.

"Which architecture reconstructs best at L0 16?" is answered by the trials that were trained to
reach that L0 (``target_l0``, see :mod:`saesweep.training.l0_control`): one row per target and
series (SAE type, or type @ hook), the best trial of the series at that target when a grid has
several (another lr, say), sorted best first by the leading metric (``feature_f1`` where the
source knows the truth, else FVU). A trial whose held-out L0 missed its target by more than
:data:`MISS_TOLERANCE` is flagged: it is not at the L0 its row claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saesweep import metric_registry as metrics
from saesweep.reporting.frontier import degenerate_reason

#: |held-out L0 / target - 1| above this is a missed target
MISS_TOLERANCE = 0.10
#: the columns of the matched-L0 table, after the target and the series
COLUMNS = ("l0", "l0_error", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "feature_f1", "feature_mcc",
           "absorption")


def _complete_targets(df: pd.DataFrame) -> pd.DataFrame:
    if not len(df) or "target_l0" not in df or "l0" not in df:
        return df.iloc[0:0]
    d = df[df["target_l0"].notna() & df["l0"].notna()]
    return d[d["state"] == "complete"] if "state" in d else d


def lead_metric(df: pd.DataFrame) -> str:
    """The metric rows are ranked by: feature F1 where the source knows the truth, else FVU."""
    return "feature_f1" if "feature_f1" in df and df["feature_f1"].notna().any() else "fvu"


def matched_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (target L0, series): its best trial, the number of trials it was chosen from
    (``trials``), and ``best`` on the first row of each target. Empty when no trial has a target."""
    d = _complete_targets(df)
    if not len(d):
        return pd.DataFrame()
    lead = lead_metric(d)
    asc = metrics.direction(lead) == "minimize"
    d = d.assign(series=d["series"] if "series" in d else d["sae_type"])
    d = d[d[lead].notna()] if d[lead].notna().any() else d
    rows = []
    for (target, series), g in d.groupby(["target_l0", "series"], sort=False):
        best = g.sort_values(lead, ascending=asc).iloc[0]
        rows.append({"target_l0": float(target), "series": series, "sae_type": best["sae_type"],
                     **{c: best.get(c) for c in COLUMNS if c in d}, "trials": len(g), "trial_id": best["trial_id"],
                     "warning": degenerate_reason(best)})
    out = pd.DataFrame(rows).sort_values(["target_l0", lead], ascending=[True, asc], kind="stable")
    out["best"] = ~out["target_l0"].duplicated()
    return out.reset_index(drop=True)


def missed_targets(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The complete trials whose held-out L0 missed ``target_l0`` by more than MISS_TOLERANCE."""
    d = _complete_targets(df)
    if not len(d):
        return []
    err = d["l0"].astype(float) / d["target_l0"].astype(float) - 1.0
    bad = d[err.abs() > MISS_TOLERANCE]
    return [{"trial_id": r["trial_id"], "sae_type": r["sae_type"], "target_l0": float(r["target_l0"]),
             "l0": float(r["l0"]), "l0_error": float(r["l0"]) / float(r["target_l0"]) - 1.0}
            for _, r in bad.iterrows()]


def missed_lines(df: pd.DataFrame) -> list[str]:
    """A warning for the end of a sweep naming the trials that missed their target L0."""
    bad = missed_targets(df)
    if not bad:
        return []
    out = [f"warning: {len(bad)} trial(s) missed their target L0 by more than {MISS_TOLERANCE:.0%} "
           "(held-out L0; a longer run, or initial_coeff nearer the answer, helps the controller):"]
    out += [f"  {b['trial_id']}: target {b['target_l0']:g}, L0 {b['l0']:.2f} ({b['l0_error']:+.0%})" for b in bad[:8]]
    if len(bad) > 8:
        out.append(f"  ... and {len(bad) - 8} more (`saesweep report` lists them)")
    return out


def matched_lines(df: pd.DataFrame) -> list[str]:
    """Every architecture at each target L0, best first: the glance at the end of a sweep."""
    t = matched_table(df)
    if not len(t):
        return []
    lead = lead_metric(_complete_targets(df))
    extra = [c for c in ("fvu", "feature_f1", "ce_loss_score", "dead_fraction") if c in t and c != lead
             and t[c].notna().any()]
    out = [f"Matched L0 (each type trained to each target_l0; best {lead} first):"]
    for target, g in t.groupby("target_l0", sort=True):
        out.append(f"  L0 {target:g}:")
        for _, r in g.iterrows():
            cols = [f"{r['series']:<22}", f"l0 {r['l0']:7.2f} ({r['l0_error']:+.1%})", f"{lead} {r[lead]:.4f}"]
            cols += [f"{c} {r[c]:.4f}" for c in extra if pd.notna(r[c])]
            out.append("    " + "  ".join(cols) + ("   <- best" if r["best"] else ""))
    return out


def plot_matched(table: pd.DataFrame, path: Path, colors: dict[str, str], *, title: str = "") -> Path:
    """Grouped bars: one group per target L0, one bar per series, for the leading metric and FVU
    (the best bar of each group outlined in black, a missed target hatched)."""
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(c for c in ("feature_f1", "fvu", "ce_loss_score") if c in table
                                and table[c].notna().any()))
    targets = sorted(table["target_l0"].unique())
    series = list(dict.fromkeys(table["series"]))
    width = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=120, squeeze=False)
    for ax, col in zip(axes[0], panels):
        asc = metrics.direction(col) == "minimize"
        for j, s in enumerate(series):
            g = table[table["series"] == s].set_index("target_l0")
            xs = np.arange(len(targets)) + (j - (len(series) - 1) / 2) * width
            for x, target in zip(xs, targets):
                if target not in g.index or pd.isna(g.loc[target, col]):
                    continue
                r = g.loc[target]
                group = table[(table["target_l0"] == target) & table[col].notna()]
                best = float(group[col].min() if asc else group[col].max())
                missed = abs(float(r["l0_error"])) > MISS_TOLERANCE if pd.notna(r.get("l0_error")) else False
                ax.bar(x, r[col], width * 0.92, color=colors.get(r["sae_type"], "#555555"),
                       edgecolor="black" if float(r[col]) == best else "none", linewidth=1.6,
                       hatch="//" if missed else None)
                if r.get("warning"):  # a degenerate SAE: crossed out
                    ax.scatter([x], [r[col]], marker="x", s=70, color="#d62728", linewidths=1.8, zorder=5)
        ax.set_xticks(np.arange(len(targets)), [f"L0 {t:g}" for t in targets])
        ax.set_ylabel(f"{metrics.label(col)}: {'lower' if asc else 'higher'} is better")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors.get(table[table["series"] == s]["sae_type"].iloc[0], "#555"))
               for s in series]
    fig.legend(handles, series, loc="upper center", ncol=min(len(series), 5), fontsize=9, frameon=False)
    fig.suptitle(f"{title}: every architecture at each target L0 (best outlined, missed target hatched, "
                 "degenerate SAE crossed)",
                 y=0.02, va="bottom", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.9))
    fig.savefig(path)
    plt.close(fig)
    return path
