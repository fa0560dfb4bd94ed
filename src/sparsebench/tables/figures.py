"""Figures of the paper tables: matplotlib on the Agg backend, written atomically to
``results/<ID>.png`` (quick smoke tests write into the temporary directory instead, so they never
overwrite the real figures)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from sparsebench.tables.schema import RESULTS
from sparsebench.tables.spec import is_quick


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
