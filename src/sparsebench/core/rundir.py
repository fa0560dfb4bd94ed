"""Run identity and run directories.

A run is identified by the SHA-256 of its resolved config (JSON with sorted keys) minus the keys in
:data:`sparsebench.config.HASH_EXCLUDE` (logging, paths, device: they do not change the result).
Its directory ``<out_dir>/<hash12>/`` holds ``config.yaml`` (resolved), ``metrics.csv`` (long
format: step, name, value), ``summary.csv`` / ``summary.json`` (final result) and ``checkpoints/``.
Idea after open_lth's ``desc.hashname``, written anew.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from sparsebench.config import HASH_EXCLUDE, NOOP_DEFAULTS
from sparsebench.core.io import atomic_write_text


def _drop(d: Dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if rest:
        if isinstance(d[head], dict):
            _drop(d[head], rest)
    else:
        del d[head]


def hashable_config(cfg: DictConfig) -> Dict[str, Any]:
    """The resolved config as plain dict without the result-neutral keys."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    for key in HASH_EXCLUDE:
        _drop(d, key)
    for key, noop in NOOP_DEFAULTS.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and leaf in node and node[leaf] == noop:
            del node[leaf]
    return d


def config_hash(cfg: DictConfig, length: int = 12) -> str:
    """Stable hex digest of the result-relevant config (seed included)."""
    blob = json.dumps(hashable_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Create ``<out_dir>/<hash>/`` and write the resolved config there (atomically)."""
    run_dir = Path(cfg.out_dir) / config_hash(cfg)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir
