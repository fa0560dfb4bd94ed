"""Run a table spec's cells through :func:`sparsebench.api.compose` / :func:`~sparsebench.api.execute`
and hand the runs to its builder.

Every cell runs once per seed (finished runs are reused through their config hash); a failing cell
is listed as missing, not fatal. ``make_table`` writes ``results/<ID>.csv`` (``results/full/`` for
the document's setting) atomically.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import pandas as pd

from sparsebench.core.errors import SparsebenchError
from sparsebench.core.progress import Progress
from sparsebench.tables.schema import RESULTS, write_table
from sparsebench.tables.spec import cell_overrides, cell_seeds, describe, get_builder, load_spec, mode_cells


def progress_setting(overrides: Sequence[str]) -> Optional[bool]:
    """``trainer.progress`` as given among a table's extra ``overrides`` (``None`` when absent or null)."""
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key == "trainer.progress" and value.lower() in ("true", "false"):
            return value.lower() == "true"
    return None


def finished_summary(overrides: Sequence[str]) -> Optional[pd.DataFrame]:
    """The stored summary of the run these overrides compose to, or None when it has not finished
    (nothing is trained or locked)."""
    from sparsebench.api import compose, config_hash, validate

    cfg = validate(compose(list(overrides)))
    path = Path(cfg.out_dir) / config_hash(cfg) / "summary.csv"
    return pd.read_csv(path) if path.is_file() else None


def run_cells(spec: dict, mode: str = "setting", extra: Sequence[str] = (), seeds: Optional[List[int]] = None,
              say: Callable[[str], None] = print, finished_only: bool = False) -> Tuple[pd.DataFrame, List[str]]:
    """Execute every cell of ``spec`` in ``mode`` for each of its seeds (or ``seeds``); with
    ``finished_only`` train nothing and collect only the runs that have finished (the others are
    returned as failed: "not finished").

    Returns the concatenated run summaries, with columns ``cell`` (index in the spec) and ``label``
    added, and the list of failed cells (``"overrides: error"``). Progress (``trainer.progress`` among
    ``extra``, default on a terminal): a tqdm bar over the cells on a terminal, else ``say`` gets one
    line per cell and seed. A SIGTERM / SIGUSR1 stops the table before its next cell (:class:`Preempted`).
    """
    from sparsebench.api import compose, execute
    from sparsebench.training.runtime import Preempted, stop_requested, stop_signals

    cells = mode_cells(spec, mode)
    jobs = [(c, s) for c in cells for s in cell_seeds(spec, c, mode, seeds)]
    frames, failed = [], []
    progress = Progress(len(jobs), spec["id"], progress_setting(extra), unit="cell", say=say)
    try:
        with stop_signals():  # one stop request for the whole table: no cell starts after a signal
            for n, (cell, seed) in enumerate(jobs, 1):
                if stop_requested():
                    raise Preempted(f"{stop_requested()} after cell {n - 1}/{len(jobs)} of {spec['id']}; rerun the "
                                    f"same command to continue (finished cells are reused)")
                ov = cell_overrides(spec, cell, mode, seed) + list(extra)
                progress.start(f"{cell.label} (seed {seed})")
                if progress.bar is None:  # one line per cell without a bar
                    say(f"[{spec['id']}] cell {n}/{len(jobs)}: {cell.label} (seed {seed})")
                try:
                    df = finished_summary(ov) if finished_only else execute(compose(ov), quiet=True)
                    if df is None:
                        raise SparsebenchError("not finished (--finished-only trains nothing)")
                except Preempted:  # SIGTERM / SIGUSR1: stop the table (the cell resumes on the rerun)
                    raise
                except SparsebenchError as err:
                    failed.append(f"{' '.join(ov)}: {err}")
                    progress.write(f"[{spec['id']}]   failed: {err}")
                    progress.done()
                    continue
                frames.append(df.assign(cell=cell.index, label=cell.label))
                progress.done()
    finally:
        progress.close()
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), failed


def build_table(spec: dict, mode: str = "setting", out_dir: Optional[Path] = None, extra: Sequence[str] = (),
                seeds: Optional[List[int]] = None, say: Callable[[str], None] = print,
                finished_only: bool = False) -> Path:
    """Run ``spec`` (a validated spec dict) in ``mode`` and write its CSV; returns the CSV path.
    ``finished_only``: build it from the runs that have finished, training nothing (see :func:`run_cells`).

    The builder gets the spec with ``scale`` generated from the presets and ``cells`` (the
    :class:`~sparsebench.tables.spec.Cell` list of the mode) added.

    Raises:
        SparsebenchError: the spec has cells and every one of them failed (no CSV is written).
    """
    spec = {**describe(spec, mode), "cells": mode_cells(spec, mode)}
    runs, failed = run_cells(spec, mode, extra=extra, seeds=seeds, say=say, finished_only=finished_only)
    if failed:
        say(f"{spec['id']}: {len(failed)} missing cell(s):")
        for f in failed:
            say(f"  missing: {f}")
    if spec["cells"] and runs.empty:
        raise SparsebenchError(f"table {spec['id']}: all {len(failed)} cells failed (first: {failed[0]}); "
                               f"no CSV written")
    table = get_builder(spec)(spec, runs)
    return write_table(table, spec["id"], out_dir)


def make_table(table_id: str, quick: bool = False, out_dir: Optional[Path] = None, extra: Sequence[str] = (),
               seeds: Optional[List[int]] = None, full: bool = False, say: Callable[[str], None] = print,
               finished_only: bool = False) -> Path:
    """Run ``experiments/<table_id>.yaml`` in its document setting (``setting`` preset; CSV into
    ``results/``), as a quick smoke test (``quick``: CSV into ``<tmp>/sparsebench-quick/``, like its
    figures, so a smoke test never overwrites a real table) or in the document's full setting (``full``:
    CSV into ``results/full/``). ``out_dir`` overrides the directory."""
    if quick and full:
        raise SparsebenchError("--quick and --full exclude each other")
    mode = "full" if full else "quick" if quick else "setting"
    out_dir = out_dir or (RESULTS / "full" if full else Path(tempfile.gettempdir()) / "sparsebench-quick" if quick
                          else None)
    return build_table(load_spec(table_id), mode, out_dir=out_dir, extra=extra, seeds=seeds, say=say,
                       finished_only=finished_only)
