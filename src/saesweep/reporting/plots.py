"""The report's figures (matplotlib, written as PNG): the L0-metric frontiers, feature density,
hyperparameter importance and per-device throughput."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from saesweep import saes
from saesweep import metric_registry as metrics
from saesweep.progress import si
from saesweep.reporting.frontier import rows_by_hook, series_of

#: colours of the SAE types (matplotlib's tab10, in the registry's order)
TYPE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
#: in a sweep over hooks, each hook's points and frontiers get a marker and a line style
HOOK_MARKERS = ["o", "s", "^", "D", "v", "P"]
HOOK_LINES = ["-", ":", "-.", (0, (5, 2, 1, 2))]
BASELINE_MARKERS = {"random_decoder": "X", "random_firing": "P", "pca": "D", "true_dictionary": "*", "oracle": "p"}


def type_colors(types: Sequence[str]) -> dict[str, str]:

    order = list(saes.names()) + [t for t in types if t not in saes.names()]
    return {t: TYPE_COLORS[order.index(t) % len(TYPE_COLORS)] for t in types}


def plot_density(density: dict[str, dict[str, Any]], path: Path, colors: dict[str, str]) -> Path:
    """Share of features per log10 firing-frequency bin, one line per type; dead ones at the left."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.8 / max(1, len(density))
    for i, (t, h) in enumerate(density.items()):
        edges = np.asarray(h["log10_edges"], dtype=float)
        total = sum(h["counts"]) + h["dead"]
        if total == 0:
            continue
        share = np.asarray(h["counts"], dtype=float) / total
        c = colors.get(t, "#555555")
        ax.stairs(share, edges, color=c, lw=1.8, label=f"{t} ({h['trials']} trials, {h['dead'] / total:.1%} dead)")
        ax.bar(edges[0] - 0.9 + (i + 0.5) * width, h["dead"] / total, width=width, color=c, alpha=0.6)
    ax.axvline(np.asarray(next(iter(density.values()))["log10_edges"])[0] - 0.05, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("log10 feature density (fraction of held-out tokens a feature fires on); bars at the left: dead")
    ax.set_ylabel("share of features")
    ax.set_title("Feature density, all complete trials of each type")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_scale(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return len(v) > 1 and (v > 0).all() and v.max() / v.min() > 20


def plot_frontier(df, x: str, y: str, path: Path, colors: dict[str, str], ids: Sequence[str],
                  per_type: dict[str, list], *, title: str = "", baselines: Sequence[dict] = (),
                  flagged: Optional[dict[str, str]] = None) -> Path:
    """``flagged``: trial id -> why its SAE is degenerate; those points are crossed out."""
    import matplotlib.pyplot as plt

    d = df[(df["state"] == "complete")].copy()
    d = d[np.isfinite(d[x].astype(float)) & np.isfinite(d[y].astype(float))]
    ydir = metrics.direction(y)
    series = series_of(d)
    several = series.nunique() > 1
    # a sweep over hooks: colour per type, marker and line style per hook, a frontier per hook
    hooks = [h for h, _ in rows_by_hook(d)]
    style = {h: (HOOK_MARKERS[i % len(HOOK_MARKERS)], HOOK_LINES[i % len(HOOK_LINES)]) for i, h in enumerate(hooks)}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for hook, rows in rows_by_hook(d):
        marker, ls = style[hook]
        for t, g in rows.groupby(series_of(rows), sort=False):
            c = colors.get(g["sae_type"].iloc[0], "#555555")
            ax.scatter(g[x], g[y], s=30, color=c, marker=marker, alpha=0.55, edgecolors="none",
                       label=f"{t} ({len(g)} trials)", zorder=2)
            f = g.set_index("trial_id").loc[per_type.get(t, [])]
            if len(f) > 1 and several:  # with one type its frontier is the black one
                ax.step(f[x], f[y], where="post", color=c, lw=1.2, ls="--" if hook is None else ls, alpha=0.9, zorder=3)
        on = [i for i in ids if i in set(rows["trial_id"])]
        if on:
            f = rows.set_index("trial_id").loc[on]
            what = "all types" if hook is None else f"all types @ {hook}"
            ax.step(f[x], f[y], where="post", color="black", lw=2.2, ls="-" if hook is None else ls, zorder=4,
                    label=f"Pareto frontier, {what} ({len(f)})")
            ax.scatter(f[x], f[y], s=70, marker=marker, facecolors="none", edgecolors="black", linewidths=1.6, zorder=5)
            for t in f["sae_type"].unique():  # frontier points in their type's colour
                ft = f[f["sae_type"] == t]
                ax.scatter(ft[x], ft[y], s=30, marker=marker, color=colors.get(t, "#555555"), zorder=6)
    bad = d[d["trial_id"].isin(list(flagged or {}))]
    if len(bad):
        ax.scatter(bad[x], bad[y], s=90, marker="x", color="#d62728", linewidths=1.8, zorder=8,
                   label=f"degenerate SAE ({len(bad)}; off the frontier)")
    if several and any(len(v) > 1 for v in per_type.values()):
        ax.plot([], [], color="gray", ls="--", lw=1.2, label="frontier of each type")
    from saesweep.metrics.baselines import KINDS

    for kind in dict.fromkeys(b["baseline"] for b in baselines):
        pts = [(b[x], b[y]) for b in baselines if b["baseline"] == kind and b.get(x) is not None and b.get(y) is not None]
        if pts:
            bx, by = zip(*pts)
            ax.scatter(bx, by, s=60, marker=BASELINE_MARKERS.get(kind, "x"), color="#888888", edgecolors="black",
                       linewidths=0.6, zorder=7, label=f"baseline: {KINDS.get(kind, kind)}")
    if _log_scale(d[x].to_numpy(dtype=float)):
        ax.set_xscale("log")
    if _log_scale(d[y].to_numpy(dtype=float)):
        ax.set_yscale("log")
    better_y = "lower" if ydir == "minimize" else "higher"
    ax.set_xlabel(f"{metrics.label(x)}: lower is sparser")
    ax.set_ylabel(f"{metrics.label(y)}: {better_y} is better")
    ax.set_title(f"{title}: sparsity vs {'fidelity' if y == 'fvu' else metrics.label(y)} ({len(d)} complete trials)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_importance(imp: dict[str, Any], path: Path, colors: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    types = list(imp["by_type"])
    n = max(1, len(types))
    cols = min(2, n)
    rows = math.ceil(n / cols)
    row_h = 2.6 if any(r["status"] == "ok" for r in imp["by_type"].values()) else 1.3
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 0.7 + row_h * rows), dpi=120, squeeze=False)
    for ax, t in zip(axes.flat, types):
        r = imp["by_type"][t]
        ax.set_title(f"{t}  ({r['n_trials']} complete trials)", fontsize=11)
        if r["status"] != "ok":
            ax.text(0.5, 0.5, _wrap(r.get("reason", "not enough trials"), 48), ha="center", va="center",
                    fontsize=9, color="#555555", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        items = sorted(r["importances"].items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color=colors.get(t, "#555555"))
        for i, (_, v) in enumerate(items):
            ax.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=9)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("share of importance")
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    fig.suptitle(f"Hyperparameter importance for {imp['metric']} ({imp['evaluator']})", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def plot_devices(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    slots = [str(r["slot"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 1.3 + 0.42 * len(rows)), dpi=120)
    y = np.arange(len(rows))
    tps = [float(r.get("tokens_per_s") or 0) for r in rows]
    a.barh(y, tps, height=0.6, color="#1f77b4")
    a.set_xlim(0, max(tps + [1.0]) * 1.25)
    a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si(v, "g")))
    a.set_xlabel("SAE-tokens per second while busy (summed over the SAEs trained at once)")
    a.set_title("Throughput per device slot")
    for i, v in enumerate(tps):
        a.text(v, i, f" {v:,.0f}", va="center", fontsize=9)
    done = [int(r.get("trials_done") or 0) for r in rows]
    failed = [int(r.get("trials_failed") or 0) for r in rows]
    b.barh(y, done, height=0.6, color="#2ca02c", label="complete")
    if any(failed):
        b.barh(y, failed, height=0.6, left=done, color="#d62728", label="failed")
    b.set_xlim(0, max([d + f for d, f in zip(done, failed)] + [1]) * 1.25)
    for i, (d, f) in enumerate(zip(done, failed)):
        b.text(d + f, i, f" {d} done" + (f", {f} failed" if f else ""), va="center", fontsize=9)
    b.set_xlabel("trials")
    b.set_title("Trials per device slot (green done, red failed)" if any(failed) else "Trials per device slot")
    for ax in (a, b):
        ax.set_yticks(y, slots)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

