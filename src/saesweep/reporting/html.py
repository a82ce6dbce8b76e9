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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from saesweep.config.sweep import sweepable
from saesweep.io import atomic_write_json, atomic_write_text
from saesweep import metric_registry as metrics
from saesweep.reporting.importance import param_importances
from saesweep.reporting.matched import MISS_TOLERANCE, lead_metric, matched_table, missed_targets, plot_matched
from saesweep.reporting.frontier import frontier_ids
from saesweep.reporting.pick import picks as choose, snippet
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
    picks: list[dict[str, Any]] = field(default_factory=list)


def build_report(store, out_dir: str | Path, *, metric: Optional[str] = None, evaluator: str = "auto",
                 title: Optional[str] = None, baselines: Optional[Sequence[dict]] = None,
                 at_l0: Sequence[float] = (), degenerate: bool = False) -> Report:
    """Write the report of the sweep in ``store`` into ``out_dir`` (see the module docstring).
    ``baselines``: the sweep's baseline rows (None: not run); ``at_l0``: L0s at which to pick the
    best trial of each type; ``degenerate``: keep degenerate SAEs on the frontiers."""
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
    flagged = dict(degenerate_trials(df))
    matched = matched_table(df)
    if len(matched):
        atomic_write_text(out / "matched_l0.json", matched.to_json(orient="records", indent=1))
        figures.append(("Matched L0", plot_matched(matched, out / "matched_l0.png", colors, title=title or store.name)))
    for y in ("feature_f1", "fvu", "ce_loss_score"):  # the truth first, where the source knows it
        if len(df) and y in df and "l0" in df and df[y].notna().any():
            ids = frontier_ids(df, "l0", y, degenerate=degenerate)
            per = frontier_ids(df, "l0", y, by_type=True, degenerate=degenerate)
            frontier[f"l0_{y}"] = {"x": "l0", "y": y, "directions": ["minimize", metrics.direction(y)],
                                   "all": ids, "by_type": per, "degenerate_included": degenerate}
            path = out / f"frontier_l0_{y}.png"
            plot_frontier(df, "l0", y, path, colors, ids, per, title=title or store.name, baselines=baselines or (),
                          flagged=flagged)
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
    objective = metric or (store.info.get("objectives") or ["fvu"])[0]
    if objective not in df:
        objective = "fvu"
    rep.picks = choose(df, objective, at_l0)
    atomic_write_json(out / "picks.json", rep.picks)
    atomic_write_text(rep.html, render_html(store, df, figures, frontier, imp, devices, colors, title=title,
                                            baselines=baselines, picks=rep.picks, objective=objective,
                                            degenerate=degenerate))
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
@dataclass
class Cell:
    text: str  # as shown (the template escapes it)
    key: str  # what the column sorts by
    color: Optional[str] = None  # a type's swatch before the text


@dataclass
class Row:
    cells: list[Cell]
    cls: str = ""  # "front": highlighted


@dataclass
class Table:
    headers: list[str]
    rows: list[Row]
    text_cols: tuple[int, ...] = (0,)  # left-aligned columns
    sortable: bool = True


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
    return str(v), str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, sortable: bool = True,
           text_cols: Sequence[int] = (0,), row_classes: Optional[Sequence[str]] = None,
           colors: Optional[dict[int, Any]] = None) -> Table:
    """A table for the template; ``colors[i](value)``: the swatch colour of column ``i``'s cells."""
    out = []
    for r_i, row in enumerate(rows):
        cells = [Cell(*_fmt(v), colors[i](v) if colors and i in colors else None) for i, v in enumerate(row)]
        out.append(Row(cells, row_classes[r_i] if row_classes else ""))
    return Table(list(headers), out, tuple(text_cols), sortable)


def _img(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("saesweep.reporting", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2")


def render_html(store, df, figures, frontier, imp, devices, colors, *, title: Optional[str] = None,
                baselines: Optional[Sequence[dict]] = None, picks: Sequence[dict] = (), objective: str = "fvu",
                degenerate: bool = False) -> str:
    """The report page (``templates/report.html.j2``) for what :func:`build_report` computed."""
    info = store.info
    spec = info.get("spec", {}) or {}
    search = spec.get("search", {}) or {}
    swatch = lambda t: colors.get(t, "#555")  # noqa: E731
    counts: dict[str, int] = {}
    for s in (df["state"] if len(df) else []):
        counts[s] = counts.get(s, 0) + 1
    method = str(search.get("method", "grid"))
    meta = [f"storage {redact(store.url)}", f"{len(df)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
            f"search {method}" + (f" (budget {search.get('n_trials')} per type, seed {search.get('seed', 0)})"
                                   if method not in ("grid", "frontier") else ""),
            "objectives " + ", ".join(info.get("objectives", []) or [])]
    if search.get("pruner", "none") != "none":
        meta.append(f"pruner {search.get('pruner')}")
    meta.append(f"written {time.strftime('%Y-%m-%d %H:%M')}")

    by_type = None
    if len(df):
        vc = df.groupby("sae_type", sort=False)["state"].value_counts().unstack(fill_value=0)
        states = ("complete", "pruned", "failed", "running", "waiting")
        by_type = _table(["sae_type", *states], [[t, *[int(vc.loc[t].get(s, 0)) for s in states]] for t in vc.index],
                         sortable=False, colors={0: swatch})
    fig = dict(figures)
    frontiers = []
    for caption, path in figures:
        if caption.startswith("Sparsity"):
            f = frontier.get("l0_" + path.stem.split("frontier_l0_")[-1], {})
            frontiers.append({"caption": caption, "img": _img(path), **_frontier_context(df, f, swatch)})
    imp_rows = []
    for t, r in imp["by_type"].items():
        if r["status"] == "ok":
            imp_rows += [[t, p, v, r["n_trials"]] for p, v in sorted(r["importances"].items(), key=lambda kv: -kv[1])]
        else:
            imp_rows.append([t, r.get("reason", r["status"]), None, r["n_trials"]])
    ok = any(r["status"] == "ok" for r in imp["by_type"].values())
    importance = {**{k: imp[k] for k in ("metric", "direction", "evaluator", "min_trials")},
                  "img": _img(fig["Hyperparameter importance"]) if ok and "Hyperparameter importance" in fig else None,
                  "table": _table(["sae_type", "parameter", "importance", "trials"], imp_rows, text_cols=(0, 1)),
                  "missing": None if ok else "Not computed for any type: " + "; ".join(
                      f"{t}: {r.get('reason', r['status'])}" for t, r in imp["by_type"].items())}
    device_block = None
    if devices:
        rows = [[d["slot"], d.get("trials_done"), d.get("trials_failed"), d.get("tokens"), d.get("tokens_per_s"),
                 d.get("busy_s"), d.get("wall_s"), d.get("busy_fraction")] for d in devices]
        device_block = {"img": _img(fig["Per-device performance"]) if "Per-device performance" in fig else None,
                        "table": _table(["slot", "trials done", "failed attempts", "SAE-tokens", "SAE-tok/s",
                                         "busy s", "wall s", "busy fraction"], rows)}
    lead = next((m for m in ("feature_f1", "ce_loss_score") if any(m in p for p in picks)), None)
    pick_rows = [[p["series"], p["choice"], p.get("trial_id", ""), p.get("l0"), p.get("fvu"),
                  *([p.get(lead)] if lead else []), p.get("why") or p.get("note", "")] for p in picks]
    pick_block = {"objective": objective, "table": _table(["type", "choice", "trial_id", "l0", "fvu",
                                                           *([lead] if lead else []), "why"], pick_rows,
                                                          sortable=False, text_cols=(0, 1, 2, 6 if lead else 5),
                                                          colors={0: swatch}),
                  "snippets": [(p["series"], p["choice"], snippet(p.get("run_dir"))) for p in picks
                               if p.get("run_dir")]} if picks else None
    missing_baselines = None if baselines else (
        "Not run for this sweep: `saesweep baseline SWEEP` scores them (or `baselines: true` in the spec)."
        if baselines is None else "None computed: no complete trial to take the width and L0s from.")
    return _template().render(
        name=title or store.name, meta=meta, by_type=by_type,
        degenerate=_degenerate_context(df), missed=_missed_context(df),
        matched=_matched_context(df, fig["Matched L0"], swatch) if "Matched L0" in fig else None,
        frontiers=frontiers, baselines=_baselines_table(baselines) if baselines else None,
        missing_baselines=missing_baselines, picks=pick_block, degenerate_shown=degenerate,
        density=_img(fig["Feature density"]) if "Feature density" in fig else None,
        importance=importance, devices=device_block, trials=_trials_table(df, frontier, swatch),
    )


def _baselines_table(rows: Sequence[dict]) -> Table:
    """The random baselines (grey markers in the plots above) as a table."""
    from saesweep.metrics.baselines import KINDS

    cols = [c for c in ("l0", "fvu", "feature_f1", "feature_mcc", "absorption", "ce_loss_score", "kl_div_score")
            if any(c in r for r in rows)]
    return _table(["baseline", *cols], [[KINDS.get(r["baseline"], r["baseline"]), *[r.get(c) for c in cols]]
                                        for r in rows])


def _matched_context(df, png: Path, swatch) -> dict[str, Any]:
    """Every architecture at each target L0: the plot, and the table with the best per L0 highlighted."""
    t = matched_table(df)
    lead = lead_metric(df[df["target_l0"].notna()])
    cols = [c for c in ("l0", "l0_error", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "feature_f1",
                        "feature_mcc", "absorption") if c in t and t[c].notna().any()]
    flagged = "warning" in t and t["warning"].astype(bool).any()
    rows = [[r["target_l0"], r["series"], *[r[c] for c in cols], r["trials"], r["trial_id"],
             *([r["warning"]] if flagged else [])] for _, r in t.iterrows()]
    table = _table(["target_l0", "series", *cols, "trials", "trial_id", *(["warning"] if flagged else [])], rows,
                   text_cols=(1, len(cols) + 3, len(cols) + 4),
                   row_classes=["front" if b else "" for b in t["best"]],
                   colors={1: lambda s: swatch(s.split(" @ ")[0])})
    return {"lead": lead, "tolerance": f"{MISS_TOLERANCE:.0%}", "img": _img(png), "table": table}


def _missed_context(df) -> Optional[dict[str, Any]]:
    """The trials whose held-out L0 missed their target (a visible warning)."""
    bad = missed_targets(df)
    if not bad:
        return None
    return {"total": len(bad), "items": bad[:20], "more": max(0, len(bad) - 20), "tolerance": f"{MISS_TOLERANCE:.0%}"}


def _degenerate_context(df) -> Optional[dict[str, Any]]:
    """The complete trials whose SAEs are degenerate (a visible warning)."""
    bad = degenerate_trials(df)
    if not bad:
        return None
    return {"total": len(bad), "items": bad[:20], "more": max(0, len(bad) - 20)}


def _frontier_context(df, f: dict, swatch) -> dict[str, Any]:
    ids = f.get("all", [])
    if not ids:
        return {"table": None}
    d = df.set_index("trial_id").loc[ids].reset_index()
    x, y = f["x"], f["y"]
    params = [c for c in _param_cols(df) if c in d]
    rows = [[r["trial_id"], r["sae_type"], r[x], r[y], *[r[p] for p in params]] for _, r in d.iterrows()]
    better = "low" if f["directions"][1] == "minimize" else "high"
    return {"count": len(ids), "x": x, "y": y, "better": better,
            "table": _table(["trial_id", "sae_type", x, y, *params], rows, text_cols=(0, 1), colors={1: swatch})}


def _param_cols(df) -> list[str]:
    return [c for c in sweepable() if c in df]


def _trials_table(df, frontier, swatch) -> Optional[Table]:
    if len(df) == 0:
        return None
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
    return _table(cols, rows, text_cols=text, row_classes=classes, colors={cols.index("sae_type"): swatch})
