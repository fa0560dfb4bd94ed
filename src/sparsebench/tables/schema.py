"""The long-format table every builder returns: :data:`TABLE_COLUMNS`, one row per (setting, metric),
the measured mean/std over seeds beside the document's reported value (or "figure only"), and
:func:`compare`, the one test every verdict column (``claim_holds`` / ``ordering_holds``) comes from."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from sparsebench.core.io import atomic_write_csv

RESULTS = Path(__file__).resolve().parents[3] / "results"

TABLE_COLUMNS = ["id", "setting", "metric", "measured", "measured_std", "reported", "dataset_used", "scale",
                 "n_seeds"]


def document_setting(spec: dict) -> str:
    """Whether the run is at the document's setting: the spec's ``document_setting`` ("yes" or
    "reduced: how"; "not stated" when absent), "reduced: quick smoke test (...)" for a quick run and
    "full preset: <preset>" for ``--full`` (read off the ``scale`` that :func:`~sparsebench.tables.spec.describe`
    generated)."""
    from sparsebench.tables.spec import QUICK_PREFIX

    scale = str(spec.get("scale", ""))
    if scale.startswith(QUICK_PREFIX):
        return (f"reduced: quick smoke test (experiment={spec.get('quick')}); the spec's setting: "
                f"{spec.get('document_setting') or 'not stated'}")
    if scale.startswith("FULL SCALE"):
        return f"full preset: {(spec.get('full') or {}).get('preset')}"
    return str(spec.get("document_setting") or "not stated")


def rows(spec: dict, setting: str, metric: str, values: Sequence[float], reported, **extra) -> dict:
    """One long-format row: mean and (ddof=1) std of ``values`` over seeds (NaNs dropped) beside ``reported``,
    plus ``document_setting`` (:func:`document_setting`)."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    return {"id": spec["id"], "setting": setting, "metric": metric,
            "measured": float(v.mean()) if v.size else float("nan"),
            "measured_std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "reported": reported, "dataset_used": spec["dataset_used"], "scale": spec["scale"],
            "n_seeds": int(v.size), "document_setting": document_setting(spec), **extra}


VERDICTS = ("holds", "reversed", "not resolved")


def _clean(values) -> np.ndarray:
    return np.asarray([x for x in np.atleast_1d(np.asarray(values, dtype=float)) if x == x], dtype=float)


def compare(a_values: Sequence[float], b_values, paired: bool = False, margin: float = 0.0,
            level: float = 0.95) -> dict:
    """Test the claim ``mean(a) > mean(b) - margin`` from the spread over seeds.

    ``a_values``, ``b_values``: one value per seed (NaNs dropped). ``paired=True``: the i-th values of
    a and b share a seed (same trained net / data order), tested by a t interval on the differences
    (``"paired t"``); else Welch's unequal-variance t (``"welch t"``). A scalar ``b_values`` is a fixed
    threshold (``"one-sample t"`` of a against it). ``margin``: the claim's tolerance in the values'
    unit (e.g. 0.01 for "within one accuracy point" on a [0, 1] accuracy).

    Returns ``dict(diff, ci_low, ci_high, p, test, verdict, n_a, n_b)``: ``diff`` = mean(a) - mean(b)
    (mean of the differences when paired), the two-sided ``level`` interval of ``diff``, the two-sided
    p-value of ``diff = -margin``, and ``verdict``: ``"holds"`` when the whole interval is above
    ``-margin``, ``"reversed"`` when it is below, else ``"not resolved"`` (a difference within noise
    never holds); ``"not resolved (n=1)"`` (n = the smaller side) when a side has fewer than 2 values.
    Zero spread (every value, or every paired difference, identical: the t statistic is undefined)
    gives a zero-width interval at ``diff`` and ``"not resolved (no spread)"``: quantised metrics (an
    accuracy on a few hundred images) make such ties common, so they decide nothing between two
    measured sides. Against a fixed threshold (scalar ``b_values``) every seed lying on the same side
    is the claim's evidence: ``"holds (all seeds equal)"`` / ``"reversed (all seeds equal)"``.

    Raises:
        ValueError: ``paired`` with a and b of different lengths (after dropping NaNs pairwise).
    """
    from scipy import stats

    a = np.asarray(a_values, dtype=float).ravel()
    scalar = np.ndim(b_values) == 0
    if paired and not scalar:
        b = np.asarray(b_values, dtype=float).ravel()
        if a.size != b.size:
            raise ValueError(f"compare(paired=True): {a.size} values of a vs {b.size} of b")
        keep = (a == a) & (b == b)
        a, b = a[keep], b[keep]
    else:
        a = _clean(a)
        b = np.asarray([float(b_values)]) if scalar else _clean(b_values)
    if scalar:
        test, n_b = "one-sample t", a.size
    else:
        test, n_b = ("paired t" if paired else "welch t"), b.size
    out = {"test": test, "n_a": int(a.size), "n_b": int(n_b)}
    n = min(a.size, n_b)
    if n < 2 or b.size == 0:
        diff = float(a.mean() - b.mean()) if a.size and b.size else float("nan")
        return {**out, "diff": diff, "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"),
                "verdict": f"not resolved (n={n})"}
    if scalar or paired:
        d = a - b if paired and not scalar else a - b[0]
        diff, se, dof = float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), d.size - 1
    else:
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        diff, se = float(a.mean() - b.mean()), float(np.sqrt(va + vb))
        dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)) if va + vb > 0 else 1.0
    if se <= 1e-9 * max(1.0, abs(diff)):  # zero up to rounding
        verdict = "not resolved (no spread)"
        if scalar and abs(diff + margin) > 1e-12:  # every seed on the same side of a fixed threshold
            verdict = "holds (all seeds equal)" if diff > -margin else "reversed (all seeds equal)"
        return {**out, "diff": diff, "ci_low": diff, "ci_high": diff, "p": float("nan"), "verdict": verdict}
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    lo, hi = diff - half, diff + half
    p = float(2 * stats.t.sf(abs((diff + margin) / se), dof))
    verdict = "holds" if lo > -margin else "reversed" if hi < -margin else "not resolved"
    return {**out, "diff": diff, "ci_low": float(lo), "ci_high": float(hi), "p": p, "verdict": verdict}


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons (e.g. ERK > SNIP ratio > uniform): "holds" when
    every part holds, "reversed" when any part is reversed, else the first unresolved part's verdict."""
    verdicts = list(verdicts)
    if not verdicts:
        return "not resolved (n=0)"
    if all(v == "holds" for v in verdicts):
        return "holds"
    if any(v == "reversed" for v in verdicts):
        return "reversed"
    return next(v for v in verdicts if v != "holds")


def describe(c: dict, name: str = "") -> str:
    """A short text of one :func:`compare` result for a ``note`` column."""
    head = f"{name}: " if name else ""
    if c["ci_low"] != c["ci_low"]:
        return f"{head}diff {c['diff']:+.4f}, {c['verdict']}"
    return (f"{head}diff {c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], p={c['p']:.3g} "
            f"({c['test']}, n={c['n_a']}/{c['n_b']}): {c['verdict']}")


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
