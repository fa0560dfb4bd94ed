"""Atomic file writes and the long-format metrics log.

Every CSV, JSON, YAML and checkpoint is written to a temporary file in the target directory and
renamed over the target (``os.replace`` is atomic on POSIX), so a crash or a full disk leaves the
previous complete file in place and never a half-written one.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

from sparsebench.core.errors import SparsebenchError


class WriteError(SparsebenchError, OSError):
    """A result file could not be written (disk full, permission); the previous file is intact."""


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file that then replaces ``path``.

    Raises:
        WriteError: on any OSError (e.g. ENOSPC); the temporary file is removed and an existing
            ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        why = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise WriteError(f"could not write {path}: {why}; the previous file (if any) is unchanged") from err
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path, df) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write_text(path, df.to_csv(index=False))


def atomic_torch_save(path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


class MetricsLog:
    """Long-format metrics ``(step, name, value)`` kept in memory and flushed atomically to CSV.

    Args:
        path: the CSV file; rows already there are loaded (resume) when ``resume`` is true.
        sinks: extra callables ``sink(step, {name: value})`` (e.g. W&B), called on every :meth:`log`.
    """

    def __init__(self, path, resume: bool = False, sinks: Optional[List[Callable]] = None):
        self.path = Path(path)
        self.rows: List[tuple] = []
        self.sinks = list(sinks or [])
        if resume and self.path.is_file():
            import pandas as pd

            df = pd.read_csv(self.path)
            self.rows = list(df.itertuples(index=False, name=None))

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.rows.append((int(step), str(k), float(v)))
        for sink in self.sinks:
            sink(step, metrics)

    def truncate(self, step: int) -> None:
        """Drop rows logged after ``step`` (used when resuming from an earlier checkpoint)."""
        self.rows = [r for r in self.rows if r[0] <= step]

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["step", "name", "value"])

    def flush(self) -> None:
        atomic_write_csv(self.path, self.frame())
