"""Run directories.

A run's directory ``<out_dir>/<run_id>/`` (the id is :func:`sparsebench.config.identity.config_hash`)
holds ``config.yaml`` (resolved), ``metrics.csv`` (long format: step, name, value), ``summary.csv`` /
``summary.json`` (final result), ``checkpoints/`` and the lock files ``.lock`` / ``.lock.holder``
(:mod:`sparsebench.core.lock`). A finished run's files are never rewritten.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sparsebench.core.io import atomic_write_text


def prepare_run_dir(cfg: DictConfig, run_id: str) -> Path:
    """Create ``<cfg.out_dir>/<run_id>/checkpoints/`` and write the resolved config there (atomically),
    unless the run has finished (``summary.csv`` exists) or ``config.yaml`` already holds that text."""
    run_dir = Path(cfg.out_dir) / run_id
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    path, text = run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True)
    if (run_dir / "summary.csv").is_file() or (path.is_file() and path.read_text() == text):
        return run_dir
    atomic_write_text(path, text)
    return run_dir
