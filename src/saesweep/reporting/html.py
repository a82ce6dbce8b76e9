"""The sweep report: a self-contained HTML page and the PNGs it shows.

``build_report(store, out_dir)`` reads the sweep store (trials, metrics, per-worker stats) and
writes into ``out_dir``:

* ``matched_l0.png`` and ``matched_l0.json`` -- when trials were trained to a ``target_l0``: every
  architecture at each target L0, best first (:mod:`saesweep.reporting.matched`);
* ``frontier_l0_fvu.png`` -- the sparsity-fidelity trade-off: L0 against FVU (both lower is
  better) for every complete trial, one colour per SAE type, each type's Pareto frontier as a
  thin step line and the frontier over all types as a thick black one;
* ``frontier_l0_ce_loss_score.png`` -- L0 against CE loss recovered (higher is better), for
  sweeps on a language model;
* ``importance.png`` and ``importance.json`` -- hyperparameter importance per SAE type;
* ``feature_density.png`` -- each type's histogram of feature firing frequencies (dead ones
  apart), from the trials' ``metrics.json``;
* ``devices.png`` -- per-device throughput and trials;
* ``frontier.json`` -- the frontier trial ids, over all types and per type;
* ``report.html`` -- all of the above with a sortable table of the trials, the images embedded:
  one file, no network needed to view it. Degenerate SAEs (dense codes or mostly dead
  features, :func:`saesweep.reporting.table.degenerate_reason`) are named in a warning at the top.
"""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from saesweep.config.sweep import sweepable
from saesweep.io import atomic_write_json, atomic_write_text
from saesweep.metrics import registry as metrics
from saesweep.reporting.importance import param_importances
from saesweep.reporting.matched import MISS_TOLERANCE, lead_metric, matched_table, missed_targets, plot_matched
from saesweep.reporting.frontier import frontier_ids
from saesweep.reporting.plots import (
    plot_density,
    plot_devices,
    plot_frontier,
    plot_importance,
    type_colors,
)
from saesweep.reporting.table import degenerate_trials, results_table
from saesweep.sweep.display import per_slot_totals
from saesweep.sweep.urls import redact


# ---------------------------------------------------------------------- data
@dataclass
class Report:
    out_dir: Path
    html: Path
    pngs: list[Path] = field(default_factory=list)
    importance: dict[str, Any] = field(default_factory=dict)
    frontier: dict[str, Any] = field(default_factory=dict)


def build_report(store, out_dir: str | Path, *, metric: Optional[str] = None, evaluator: str = "auto",
                 title: Optional[str] = None, baselines: Sequence[dict] = ()) -> Report:
    """Write the report of the sweep in ``store`` into ``out_dir`` (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_table(store)
    types = list(dict.fromkeys(df["sae_type"])) if len(df) else []
    colors = type_colors(types)
    rep = Report(out, out / "report.html")

    figures: list[tuple[str, Path]] = []
    frontier: dict[str, Any] = {}
    matched = matched_table(df)
    if len(matched):
        atomic_write_text(out / "matched_l0.json", matched.to_json(orient="records", indent=1))
        figures.append(("Matched L0", plot_matched(matched, out / "matched_l0.png", colors, title=title or store.name)))
    for y in ("feature_f1", "fvu", "ce_loss_score"):  # the truth first, where the source knows it
        if len(df) and y in df and "l0" in df and df[y].notna().any():
            ids = frontier_ids(df, "l0", y)
            per = frontier_ids(df, "l0", y, by_type=True)
            frontier[f"l0_{y}"] = {"x": "l0", "y": y, "directions": ["minimize", metrics.direction(y)],
                                   "all": ids, "by_type": per}
            path = out / f"frontier_l0_{y}.png"
            plot_frontier(df, "l0", y, path, colors, ids, per, title=title or store.name, baselines=baselines)
            figures.append((f"Sparsity vs {metrics.label(y)}", path))
    rep.frontier = frontier
    atomic_write_json(out / "frontier.json", frontier)

    imp = param_importances(store, metric, evaluator=evaluator, sae_types=types or None)
    rep.importance = imp
    atomic_write_json(out / "importance.json", imp)
    if types:
        path = out / "importance.png"
        plot_importance(imp, path, colors)
        figures.append(("Hyperparameter importance", path))

    density = density_by_type(df)
    if density:
        path = out / "feature_density.png"
        plot_density(density, path, colors)
        figures.append(("Feature density", path))

    devices = device_stats(store, df)
    if devices:
        path = out / "devices.png"
        plot_devices(devices, path)
        figures.append(("Per-device performance", path))
    rep.pngs = [p for _, p in figures]
    atomic_write_text(rep.html, render_html(store, df, figures, frontier, imp, devices, colors, title=title,
                                            baselines=baselines))
    return rep


def device_stats(store, df) -> list[dict[str, Any]]:
    """Per-slot totals of the sweep's worker runs, or per device from the trials when none were saved."""

    rows = per_slot_totals(store)
    if rows:
        return rows
    if len(df) == 0 or "device" not in df:
        return []
    out = []
    for dev, g in df[df["state"] == "complete"].groupby("device"):
        busy = float(g["train_time_s"].sum()) if "train_time_s" in g else 0.0
        tokens = float(g["tokens"].sum()) if "tokens" in g else 0.0
        out.append({"slot": str(dev), "trials_done": int(len(g)), "trials_failed": 0, "tokens": tokens, "busy_s": busy,
                    "wall_s": float("nan"), "tokens_per_s": tokens / busy if busy else 0.0, "busy_fraction": float("nan")})
    return out


def density_by_type(df) -> dict[str, dict[str, Any]]:
    """Each type's feature-density histogram, summed over its complete trials' metrics.json
    (``{type: {"log10_edges", "counts", "dead", "trials"}}``)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    if len(df) == 0 or "run_dir" not in df:
        return out
    for _, r in df[df["state"] == "complete"].iterrows():
        try:
            hist = json.loads((Path(str(r["run_dir"])) / "metrics.json").read_text()).get("feature_density")
        except (OSError, ValueError, TypeError):
            continue
        if not hist:
            continue
        h = out.setdefault(r["sae_type"], {"log10_edges": hist["log10_edges"], "counts": [0] * len(hist["counts"]),
                                           "dead": 0, "trials": 0})
        if h["log10_edges"] == hist["log10_edges"]:
            h["counts"] = [a + b for a, b in zip(h["counts"], hist["counts"])]
            h["dead"] += hist["dead"]
            h["trials"] += 1
    return out




# ----------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555} img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:.6em 0} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5;position:sticky;top:0;cursor:pointer;user-select:none;white-space:nowrap}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
td.s,th.s{text-align:left} td{white-space:nowrap} tr.front td{background:#fff8dc} .swatch{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:5px}
.note{color:#666;font-size:.9em} .scroll{max-height:640px;overflow:auto;border:1px solid #eee}
.warn{background:#fff3f3;border:1px solid #e0a0a0;border-left:5px solid #d62728;padding:8px 12px;margin:1em 0}
"""

JS = """
function sortTable(th){
  const table=th.closest('table'), body=table.tBodies[0], idx=[...th.parentNode.children].indexOf(th);
  const asc=!th.classList.contains('sorted-asc');
  [...th.parentNode.children].forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
  th.classList.add(asc?'sorted-asc':'sorted-desc');
  const key=td=>{const v=td.dataset.v; if(v===undefined||v==='') return null; const n=Number(v); return isNaN(n)?v.toLowerCase():n;};
  const rows=[...body.rows].sort((a,b)=>{const x=key(a.cells[idx]), y=key(b.cells[idx]);
    if(x===null&&y===null) return 0; if(x===null) return 1; if(y===null) return -1;
    return (x<y?-1:x>y?1:0)*(asc?1:-1);});
  rows.forEach(r=>body.appendChild(r));
}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortTable(th)));
"""


def _fmt(v: Any) -> tuple[str, str]:
    """(shown text, sort key) of a table cell."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "", ""
    if isinstance(v, bool):
        return str(v), str(int(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}", str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if abs(f) >= 1000 or (f.is_integer() and abs(f) >= 10):
            return f"{f:,.0f}", repr(f)
        return f"{f:.4g}", repr(f)
    return html.escape(str(v)), html.escape(str(v))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, sortable: bool = True,
           text_cols: Sequence[int] = (0,), row_classes: Optional[Sequence[str]] = None, prefix=None) -> str:
    cls = ' class="sortable"' if sortable else ""
    out = [f"<table{cls}><thead><tr>"]
    out += [f'<th class="{"s" if i in text_cols else ""}">{html.escape(h)}</th>' for i, h in enumerate(headers)]
    out.append("</tr></thead><tbody>")
    for r_i, row in enumerate(rows):
        rc = f' class="{row_classes[r_i]}"' if row_classes and row_classes[r_i] else ""
        out.append(f"<tr{rc}>")
        for i, v in enumerate(row):
            text, key = _fmt(v)
            if prefix and i in prefix:
                text = prefix[i](v) + text
            out.append(f'<td class="{"s" if i in text_cols else ""}" data-v="{key}">{text}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(store, df, figures, frontier, imp, devices, colors, *, title: Optional[str] = None,
                baselines: Sequence[dict] = ()) -> str:

    info = store.info
    spec = info.get("spec", {}) or {}
    search = spec.get("search", {}) or {}
    name = title or store.name
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>saesweep report: {html.escape(name)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>saesweep report: {html.escape(name)}</h1>"]
    counts: dict[str, int] = {}
    for s in (df["state"] if len(df) else []):
        counts[s] = counts.get(s, 0) + 1
    method = search.get("method", "grid")
    parts.append(
        f"<p class='meta'>storage {html.escape(redact(store.url))} &middot; {len(df)} trials: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f" &middot; search {html.escape(str(method))}"
        + (f" (budget {search.get('n_trials')} per type, seed {search.get('seed', 0)})" if method not in ("grid", "frontier") else "")
        + f" &middot; objectives {html.escape(', '.join(info.get('objectives', []) or []))}"
        + (f" &middot; pruner {html.escape(str(search.get('pruner')))}" if search.get("pruner", "none") != "none" else "")
        + f" &middot; written {time.strftime('%Y-%m-%d %H:%M')}</p>")
    if len(df):
        by_type = df.groupby("sae_type", sort=False)["state"].value_counts().unstack(fill_value=0)
        rows = [[t, *[int(by_type.loc[t].get(s, 0)) for s in ("complete", "pruned", "failed", "running", "waiting")]]
                for t in by_type.index]
        sw = {0: lambda t: f"<span class='swatch' style='background:{colors.get(t, '#555')}'></span>"}
        parts.append(_table(["sae_type", "complete", "pruned", "failed", "running", "waiting"], rows, sortable=False, prefix=sw))
    else:
        parts.append("<p>No trials yet.</p>")
    parts.append(_degenerate_block(df))
    parts.append(_missed_block(df))
    fig = dict((c, p) for c, p in figures)
    if "Matched L0" in fig:
        parts.append(_matched_block(df, fig["Matched L0"], colors))

    for caption, path in figures:
        if caption.startswith("Sparsity"):
            key = "l0_" + path.stem.split("frontier_l0_")[-1]
            f = frontier.get(key, {})
            parts.append(f"<h2>{html.escape(caption)}</h2>")
            parts.append(_img(path, caption))
            parts.append(_frontier_table(df, f, colors))
    if baselines:
        parts.append(_baselines_block(baselines))
    if "Feature density" in fig:
        parts.append("<h2>Feature density</h2><p class='note'>How often each feature fires on the held-out "
                     "tokens, over all complete trials of a type; dead features (never firing) at the left.</p>")
        parts.append(_img(fig["Feature density"], "feature density"))
    parts.append("<h2>Hyperparameter importance</h2>")
    parts.append(f"<p class='note'>For <b>{html.escape(imp['metric'])}</b> ({imp['direction']}), per SAE type, "
                 f"with Optuna's {html.escape(imp['evaluator'])} evaluator on the complete trials of the type "
                 f"(needs at least {imp['min_trials']} trials and 2 varying parameters). Also in importance.json.</p>")
    if "Hyperparameter importance" in fig:
        parts.append(_img(fig["Hyperparameter importance"], "importance"))
    rows = []
    for t, r in imp["by_type"].items():
        if r["status"] == "ok":
            rows += [[t, p, v, r["n_trials"]] for p, v in sorted(r["importances"].items(), key=lambda kv: -kv[1])]
        else:
            rows.append([t, r.get("reason", r["status"]), None, r["n_trials"]])
    parts.append(_table(["sae_type", "parameter", "importance", "trials"], rows, text_cols=(0, 1)))

    parts.append("<h2>Per-device performance</h2>")
    if devices:
        if "Per-device performance" in fig:
            parts.append(_img(fig["Per-device performance"], "devices"))
        rows = [[d["slot"], d.get("trials_done"), d.get("trials_failed"), d.get("tokens"), d.get("tokens_per_s"),
                 d.get("busy_s"), d.get("wall_s"), d.get("busy_fraction")] for d in devices]
        parts.append(_table(["slot", "done", "failed", "SAE-tokens", "SAE-tok/s", "busy s", "wall s", "busy fraction"], rows))
    else:
        parts.append("<p class='note'>No per-device statistics recorded yet.</p>")

    parts.append("<h2>Trials</h2><p class='note'>Click a column to sort. Rows on the L0-FVU frontier are highlighted.</p>")
    parts.append(_trials_table(df, frontier, colors))
    parts.append(f"<script>{JS}</script></body></html>")
    return "".join(parts)


def _baselines_block(rows: Sequence[dict]) -> str:
    """The random baselines (grey markers in the plots above) as a table."""
    from saesweep.metrics.baselines import KINDS

    cols = [c for c in ("l0", "fvu", "feature_f1", "feature_mcc", "absorption", "ce_loss_score", "kl_div_score")
            if any(c in r for r in rows)]
    table = _table(["baseline", *cols], [[KINDS.get(r["baseline"], r["baseline"]), *[r.get(c) for c in cols]] for r in rows],
                   text_cols=(0,))
    return ("<h2>Random baselines</h2><p class='note'>Dictionaries that learned nothing, at the sweep's width and "
            "L0s (<code>saesweep baseline</code>): an SAE is worth its training where it beats them at its L0.</p>"
            + table)


def _matched_block(df, png: Path, colors) -> str:
    """Every architecture at each target L0: the plot, and the table with the best per L0 highlighted."""
    t = matched_table(df)
    lead = lead_metric(df[df["target_l0"].notna()])
    cols = [c for c in ("l0", "l0_error", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "feature_f1",
                        "feature_mcc", "absorption") if c in t and t[c].notna().any()]
    rows = [[r["target_l0"], r["series"], *[r[c] for c in cols], r["trials"], r["trial_id"]] for _, r in t.iterrows()]
    sw = {1: lambda s: f"<span class='swatch' style='background:{colors.get(s.split(' @ ')[0], '#555')}'></span>"}
    classes = ["front" if b else "" for b in t["best"]]
    return ("<h2 id='matched'>Matched L0: every architecture at each target</h2>"
            f"<p class='note'>Trials trained to reach a target L0 (<code>target_l0</code>). Per target, the types "
            f"are sorted by <b>{html.escape(lead)}</b>, the best highlighted; <i>l0</i> is the held-out L0 and "
            f"<i>l0_error</i> its distance from the target (beyond &plusmn;{MISS_TOLERANCE:.0%}: flagged above). "
            "Where a series has several trials at a target, its best is shown (<i>trials</i>).</p>"
            + _img(png, "matched L0")
            + _table(["target_l0", "series", *cols, "trials", "trial_id"], rows, text_cols=(1, len(cols) + 3),
                     row_classes=classes, prefix=sw))


def _missed_block(df) -> str:
    """A visible warning naming the trials whose held-out L0 missed their target."""
    bad = missed_targets(df)
    if not bad:
        return ""
    items = "".join(f"<li><code>{html.escape(b['trial_id'])}</code>: target {b['target_l0']:g}, held-out L0 "
                    f"{b['l0']:.2f} ({b['l0_error']:+.0%})</li>" for b in bad[:20])
    more = f"<li>... and {len(bad) - 20} more</li>" if len(bad) > 20 else ""
    return (f"<div class='warn' id='missed'><b>Warning: {len(bad)} trial(s) missed their target L0 by more than "
            f"{MISS_TOLERANCE:.0%}</b>: they are not at the sparsity their target says.<ul>{items}{more}</ul></div>")


def _degenerate_block(df) -> str:
    """A visible warning naming the complete trials whose SAEs are degenerate."""

    bad = degenerate_trials(df)
    if not bad:
        return ""
    items = "".join(f"<li><code>{html.escape(t)}</code>: {html.escape(w)}</li>" for t, w in bad[:20])
    more = f"<li>... and {len(bad) - 20} more (column <i>warning</i> below)</li>" if len(bad) > 20 else ""
    return (f"<div class='warn' id='degenerate'><b>Warning: {len(bad)} complete trial(s) trained degenerate SAEs</b> "
            "(dense codes: L0 above half the dictionary or above d_in; or more than half of the features dead). "
            f"Their metrics do not describe a useful SAE.<ul>{items}{more}</ul></div>")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"


def _frontier_table(df, f: dict, colors) -> str:
    ids = f.get("all", [])
    if not ids:
        return "<p class='note'>No complete trials with these metrics yet.</p>"
    d = df.set_index("trial_id").loc[ids].reset_index()
    x, y = f["x"], f["y"]
    params = [c for c in _param_cols(df) if c in d]
    rows = [[r["trial_id"], r["sae_type"], r[x], r[y], *[r[p] for p in params]] for _, r in d.iterrows()]
    sw = {1: lambda t: f"<span class='swatch' style='background:{colors.get(t, '#555')}'></span>"}
    better = "lower" if f["directions"][1] == "minimize" else "higher"
    return (f"<p class='note'>{len(ids)} trials on the frontier over all types: for each, no other trial has a "
            f"{x} as low and a {y} as {'low' if better == 'lower' else 'high'}, one of them strictly better.</p>"
            + _table(["trial_id", "sae_type", x, y, *params], rows, text_cols=(0, 1), prefix=sw))


def _param_cols(df) -> list[str]:

    return [c for c in sweepable() if c in df]


def _trials_table(df, frontier, colors) -> str:
    if len(df) == 0:
        return "<p>No trials.</p>"
    on = set(frontier.get("l0_fvu", {}).get("all", []))
    params = _param_cols(df)
    shown = [m for m in metrics.table_metrics() if m in df]

    why = dict(degenerate_trials(df))
    df = df.assign(warning=[why.get(t, "") for t in df["trial_id"]])
    cols = ["trial_id", "sae_type", "state", *params, *shown, "warning", "device", "duration_s", "reason"]
    cols = [c for c in cols if c in df]
    rows = [[r.get(c) for c in cols] for _, r in df.iterrows()]
    classes = ["front" if tid in on else "" for tid in df["trial_id"]]
    text = tuple(i for i, c in enumerate(cols) if c in ("trial_id", "sae_type", "state", "warning", "device", "reason"))
    sw = {cols.index("sae_type"): lambda t: f"<span class='swatch' style='background:{colors.get(t, '#555')}'></span>"}
    return "<div class='scroll'>" + _table(cols, rows, text_cols=text, row_classes=classes, prefix=sw) + "</div>"
