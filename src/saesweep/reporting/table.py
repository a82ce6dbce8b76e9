"""A sweep's results as one flat table: params and metrics of every trial."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import pandas as pd

from saesweep.config.sweep import sweepable
from saesweep.io import atomic_write_bytes, atomic_write_text
from saesweep.reporting.frontier import HOOK_AXIS, degenerate_reason, frontier_ids
from saesweep.sweep.store import SweepStore, TrialRecord


def results_table(store: SweepStore | Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial of ``store`` (or of records already read from it)."""
    rows = []
    for r in store.records() if isinstance(store, SweepStore) else store:
        row = {"trial_id": r.trial_id, "sae_type": r.sae_type, "state": r.state, "attempts": r.attempts}
        row.update({k: r.params.get(k) for k in sweepable()})
        row.update({k: v for k, v in r.params.items() if k not in sweepable()})
        row.update(r.metrics)
        row.update(reason=r.reason, device=r.device, worker=r.worker, duration_s=r.duration_s, run_dir=r.run_dir)
        rows.append(row)
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    df = df.dropna(axis=1, how="all")
    df["series"] = series_labels(df)
    return df


#: the grid axis that splits a sweep's frontiers beyond the SAE type (layers as a sweep axis)


def series_labels(df: pd.DataFrame) -> pd.Series:
    """What a frontier is drawn per: the SAE type, or ``"<type> @ <hook>"`` when the sweep
    trains at several hooks (a frontier across layers would compare unlike activations)."""
    if HOOK_AXIS in df and df[HOOK_AXIS].nunique(dropna=True) > 1:
        return df["sae_type"] + " @ " + df[HOOK_AXIS].fillna("?").astype(str)
    return df["sae_type"].copy()


def write_table(df: pd.DataFrame, stem: Path) -> list[Path]:
    """``<stem>.csv`` and ``<stem>.parquet``, each written atomically."""
    stem = Path(stem)
    csv = atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    parquet = atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
    return [csv, parquet]


def complete_trials(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"] == "complete"] if "state" in df else df


def degenerate_trials(df: pd.DataFrame) -> list[tuple[str, str]]:
    """``(trial_id, reason)`` of the complete trials whose SAEs are degenerate."""
    if not len(df) or "l0" not in df:
        return []
    return [(r["trial_id"], why) for _, r in complete_trials(df).iterrows() if (why := degenerate_reason(r))]


def degenerate_lines(df: pd.DataFrame) -> list[str]:
    """A warning line for the sweep's end when complete trials are degenerate."""
    bad = degenerate_trials(df)
    if not bad:
        return []
    lines = [f"warning: {len(bad)} of {len(complete_trials(df))} complete trials trained degenerate SAEs "
             "(dense or far too sparse codes, or mostly dead features); their metrics do not describe a useful SAE:"]
    lines += [f"  {tid}: {why}" for tid, why in bad[:5]]
    if len(bad) > 5:
        lines.append(f"  ... and {len(bad) - 5} more (`saesweep report` lists them)")
    return lines


def frontier_lines(df: pd.DataFrame, *, max_rows: int = 5) -> list[str]:
    """A few points of each SAE type's L0-FVU Pareto frontier, for the end of a sweep.

    The full frontier (and the plots) are in ``saesweep report``; this is the glance a
    researcher wants when the sweep ends: how sparse, how faithful, with which settings.
    """
    if "state" in df:  # mid-run, only finished trials count
        df = df[df["state"] == "complete"]
    fronts = frontier_ids(df, "l0", "fvu", by_type=True)
    if not fronts:
        return []
    by_id = df.set_index("trial_id")
    params = [p for p in sweepable() if p in df and df[p].nunique(dropna=True) > 1 and p != HOOK_AXIS]
    extra = [k for k in ("feature_f1", "absorption", "ce_loss_score") if k in df and df[k].notna().any()]
    out = ["L0-FVU frontier per type (a few points; `saesweep report` draws them all):"]
    series = df["series"] if "series" in df else df["sae_type"]
    for t, ids in fronts.items():
        pick = ids if len(ids) <= max_rows else [ids[round(i * (len(ids) - 1) / (max_rows - 1))] for i in range(max_rows)]
        out.append(f"  {t}: {len(ids)} of {int((series == t).sum())} complete trials on the frontier")
        for tid in pick:
            r = by_id.loc[tid]
            lead = [f"feature_f1 {r['feature_f1']:.3f}"] if "feature_f1" in extra else []
            cols = lead + [f"l0 {r['l0']:8.2f}", f"fvu {r['fvu']:.4f}"]
            cols += [f"{k} {r[k]:.3f}" for k in extra if k != "feature_f1"]
            cols += [f"{p}={r[p]:g}" if isinstance(r[p], float) else f"{p}={r[p]}" for p in params if pd.notna(r[p])]
            out.append("    " + "  ".join(cols))
    return out
