"""A sweep's results as one flat table: params and metrics of every trial."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from .io import atomic_write_bytes, atomic_write_text
from .store import SweepStore

PARAM_ORDER = ("lr", "dict_size_ratio", "sparsity_coeff", "aux_coeff", "initial_beta", "final_beta", "input_dependent_gates")


def results_table(store: SweepStore) -> pd.DataFrame:
    rows = []
    for r in store.records():
        row = {"trial_id": r.trial_id, "sae_type": r.sae_type, "state": r.state, "attempts": r.attempts}
        row.update({k: r.params.get(k) for k in PARAM_ORDER})
        row.update({k: v for k, v in r.params.items() if k not in PARAM_ORDER})
        row.update(r.metrics)
        row.update(reason=r.reason, device=r.device, worker=r.worker, duration_s=r.duration_s, run_dir=r.run_dir)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.dropna(axis=1, how="all") if len(df) else df


def write_table(df: pd.DataFrame, stem: Path) -> list[Path]:
    """``<stem>.csv`` and ``<stem>.parquet``, each written atomically."""
    stem = Path(stem)
    csv = atomic_write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    parquet = atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
    return [csv, parquet]
