"""Paper tables: experiment specs in ``experiments/<ID>.yaml``, builders here, CSVs in ``results/``.

An experiment spec (YAML) has::

    id: T003-imp                      # the ID of ../shared/papers/TABLES.md
    document: 003_c6b5fcc804eabf0c.txt
    what: one line
    dataset_used: mnist               # what we ran here (may differ from the document's)
    scale: "LeNet-300-100, 3 epochs/round, 1 seed"   # honest description of the reduced scale
    seeds: [0, 1, 2]
    runs:                              # Hydra override lists; each is run once per seed
      - [model=lenet300_100, dataset=mnist, method=lth_imp, method.rounds=18]
    quick: [trainer.iterations=20, dataset.train_subset=500]   # appended in CI smoke tests
    full_scale:                        # the document's setting, for users with the data/GPU
      - [model=wrn28x5, dataset=cifar100, ...]
    builder: sparsebench.tables.lth:t003_imp   # function(spec, runs_df) -> table DataFrame

Every table CSV has at least :data:`TABLE_COLUMNS` (long format: one row per setting and metric,
the measured mean/std beside the document's reported value, or "figure only"); builders may add
columns. ``scripts/make_table.py ID`` runs the spec (finished runs are reused through their config
hash) and writes ``results/ID.csv`` atomically; cells whose runs failed are listed as missing.
"""
from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pandas as pd
import yaml

from sparsebench.core.errors import ConfigError
from sparsebench.core.io import atomic_write_csv

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS = ROOT / "experiments"
RESULTS = ROOT / "results"

QUICK_PREFIX = "QUICK SMOKE TEST"  # starts spec["scale"] when make_table runs a quick smoke test

TABLE_COLUMNS = ["id", "setting", "metric", "measured", "measured_std", "reported", "dataset_used", "scale",
                 "n_seeds"]


def is_quick(spec: dict) -> bool:
    """True when :func:`make_table` runs the spec as a quick smoke test."""
    return str(spec.get("scale", "")).startswith(QUICK_PREFIX)


def figure_path(spec: dict) -> Path:
    """``results/<ID>.png``, or a file in the temporary directory for quick smoke tests."""
    if is_quick(spec):
        return Path(tempfile.gettempdir()) / f"sparsebench-quick-{spec['id']}.png"
    return RESULTS / f"{spec['id']}.png"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, spec: dict, **savefig_kw) -> Path:
    """Write ``fig`` to :func:`figure_path` atomically (a temporary file, then a rename), close it,
    return the path. ``savefig_kw`` go to ``Figure.savefig`` (e.g. ``dpi``)."""
    path = figure_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, **savefig_kw)
    tmp.replace(path)
    pyplot().close(fig)
    return path


def load_spec(table_id: str) -> dict:
    """Read ``experiments/<table_id>.yaml``. Raises ConfigError naming the file when absent."""
    path = EXPERIMENTS / f"{table_id}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS.glob("T*.yaml"))
        raise ConfigError(f"table {table_id}: no {path} (known: {', '.join(known)})")
    spec = yaml.safe_load(path.read_text())
    for key in ("id", "runs", "builder", "dataset_used", "scale"):
        if key not in spec:
            raise ConfigError(f"{path}: missing key '{key}'")
    return spec


def get_builder(spec: dict) -> Callable:
    mod, _, fn = spec["builder"].partition(":")
    return getattr(importlib.import_module(mod), fn)


def check_table(df: pd.DataFrame, table_id: str) -> pd.DataFrame:
    """Raise ValueError unless ``df`` has every column of :data:`TABLE_COLUMNS` and at least one row."""
    missing = [c for c in TABLE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"table {table_id}: missing columns {missing}")
    if df.empty:
        raise ValueError(f"table {table_id}: no rows")
    return df[TABLE_COLUMNS + [c for c in df.columns if c not in TABLE_COLUMNS]]


def write_table(df: pd.DataFrame, table_id: str, out_dir: Optional[Path] = None) -> Path:
    """Check the schema and write ``results/<table_id>.csv`` atomically."""
    df = check_table(df, table_id)
    return atomic_write_csv(Path(out_dir or RESULTS) / f"{table_id}.csv", df)


def rows(spec: dict, setting: str, metric: str, values: Sequence[float], reported, **extra) -> dict:
    """One long-format row: mean and std of ``values`` over seeds beside ``reported``."""
    import numpy as np

    v = np.asarray([x for x in values if x == x], dtype=float)
    return {"id": spec["id"], "setting": setting, "metric": metric,
            "measured": float(v.mean()) if v.size else float("nan"),
            "measured_std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "reported": reported, "dataset_used": spec["dataset_used"], "scale": spec["scale"],
            "n_seeds": int(v.size), **extra}


def run_spec(spec: dict, quick: bool = False, extra: Sequence[str] = (), seeds: Optional[List[int]] = None
             ) -> tuple[pd.DataFrame, List[str]]:
    """Execute every run of ``spec`` for every seed (reusing finished runs). Returns the concatenated
    summaries (column ``run_index`` = position in ``spec['runs']``) and the list of failed cells."""
    from sparsebench.api import compose, execute
    from sparsebench.core.errors import SparsebenchError

    frames, failed = [], []
    for i, overrides in enumerate(spec["runs"]):
        for seed in (seeds if seeds is not None else spec.get("seeds", [0])):
            ov = list(overrides) + [f"seed={seed}", f"experiment={spec['id']}"]
            if quick:
                ov += list(spec.get("quick", []))
            ov += list(extra)
            try:
                df = execute(compose(ov), quiet=True)
            except SparsebenchError as err:
                failed.append(f"{' '.join(ov)}: {err}")
                continue
            df = df.copy()
            df["run_index"] = i
            frames.append(df)
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), failed


def full_scale_spec(spec: dict) -> dict:
    """The spec with its ``full_scale`` runs (the document's setting) in place of the reduced ``runs``.

    Raises:
        ConfigError: the spec has no ``full_scale`` entry.
    """
    if not spec.get("full_scale"):
        raise ConfigError(f"table {spec['id']}: experiments/{spec['id']}.yaml has no 'full_scale' runs")
    datasets = sorted({o.split("=", 1)[1] for run in spec["full_scale"] for o in run if o.startswith("dataset=")})
    return {**spec, "runs": spec["full_scale"], "quick": [],
            "dataset_used": ", ".join(datasets) or spec["dataset_used"],
            "scale": f"FULL SCALE (the document's setting): {spec.get('full_scale_note', 'see full_scale in the spec')}"}


def make_table(table_id: str, quick: bool = False, out_dir: Optional[Path] = None, extra: Sequence[str] = (),
               seeds: Optional[List[int]] = None, full: bool = False) -> Path:
    """Run ``experiments/<table_id>.yaml`` and write its CSV; failed cells are reported, not fatal.

    With ``full`` the spec's ``full_scale`` runs are used and the CSV goes to ``results/full/``.
    """
    spec = load_spec(table_id)
    if full:
        spec = full_scale_spec(spec)
        out_dir = out_dir or RESULTS / "full"
    if quick:
        spec["scale"] = f"{QUICK_PREFIX} (overrides {' '.join(spec.get('quick', []))}); full: {spec['scale']}"
    runs, failed = run_spec(spec, quick=quick, extra=extra, seeds=seeds)
    if failed:
        print(f"{table_id}: {len(failed)} missing cell(s):")
        for f in failed:
            print("  missing:", f)
    if spec["runs"] and runs.empty:
        from sparsebench.core.errors import SparsebenchError

        raise SparsebenchError(f"table {table_id}: all {len(failed)} cells failed (first: {failed[0]}); "
                               f"no CSV written")
    table = get_builder(spec)(spec, runs)
    return write_table(table, table_id, out_dir)
