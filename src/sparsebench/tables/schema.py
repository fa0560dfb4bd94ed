"""The long-format table every builder returns: :data:`TABLE_COLUMNS`, one row per (setting, metric),
the measured mean/std over seeds beside the document's reported value (or "figure only")."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from sparsebench.core.io import atomic_write_csv

RESULTS = Path(__file__).resolve().parents[3] / "results"

TABLE_COLUMNS = ["id", "setting", "metric", "measured", "measured_std", "reported", "dataset_used", "scale",
                 "n_seeds"]


def rows(spec: dict, setting: str, metric: str, values: Sequence[float], reported, **extra) -> dict:
    """One long-format row: mean and (ddof=1) std of ``values`` over seeds (NaNs dropped) beside ``reported``."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    return {"id": spec["id"], "setting": setting, "metric": metric,
            "measured": float(v.mean()) if v.size else float("nan"),
            "measured_std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "reported": reported, "dataset_used": spec["dataset_used"], "scale": spec["scale"],
            "n_seeds": int(v.size), **extra}


def check_table(df: pd.DataFrame, table_id: str) -> pd.DataFrame:
    """``df`` with :data:`TABLE_COLUMNS` first.

    Raises:
        ValueError: a column of :data:`TABLE_COLUMNS` is missing, or ``df`` has no rows.
    """
    missing = [c for c in TABLE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"table {table_id}: missing columns {missing}")
    if df.empty:
        raise ValueError(f"table {table_id}: no rows")
    return df[TABLE_COLUMNS + [c for c in df.columns if c not in TABLE_COLUMNS]]


def write_table(df: pd.DataFrame, table_id: str, out_dir: Optional[Path] = None) -> Path:
    """Check the schema and write ``<out_dir or results>/<table_id>.csv`` atomically; returns the path."""
    df = check_table(df, table_id)
    return atomic_write_csv(Path(out_dir or RESULTS) / f"{table_id}.csv", df)
