"""sparsebench: sparse neural networks and graph-based semi-supervised learning, one run per config.

Data flow of a run: ``run.py`` -> ``sparsebench.config`` (the validated, typed config) ->
``sparsebench.data`` / ``sparsebench.models`` -> a method from ``sparsebench.methods`` -> the shared
trainer (``sparsebench.training``) or, for label spreading, ``sparsebench.graph`` -> one summary
row per run (``sparsebench.core.rundir``), which ``sparsebench.tables`` aggregates into paper tables.

Library use: ``sparsebench.LabelSpreading`` is the scikit-learn estimator of the label-spreading
pipeline (:mod:`sparsebench.graph.estimator`). Nothing heavy is imported until it is asked for.
"""
from __future__ import annotations

_LAZY = {"LabelSpreading": "sparsebench.graph.estimator"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """Import a public name on first access (PEP 562), keeping ``import sparsebench`` cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsebench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
