"""Atomic file writes and the long-format metrics log.

Every CSV, JSON, YAML and checkpoint is written to a temporary file in the target directory and
renamed over the target (``os.replace`` is atomic on POSIX), so a crash or a full disk leaves the
previous complete file in place and never a half-written one. Files get the mode a plain ``open``
would give (``0o666`` minus the user's umask), not ``mkstemp``'s private ``0o600``, so a group can read
results on a shared file system. Checkpoints keep their previous version (``<name>.prev.pt``) until the
new one is complete; :func:`load_torch` falls back to it when the newest file is corrupt or truncated.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

from sparsebench.core.errors import SparsebenchError


class WriteError(SparsebenchError, OSError):
    """A result file could not be written (disk full, permission); the previous file is intact."""


def umask_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` would create a file with."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _low_on_space(directory: Path, margin: int = 64 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def atomic_write(path, write: Callable[[io.BufferedWriter], None], keep_previous: bool = False) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file that then replaces ``path``.

    Args:
        keep_previous: first move an existing ``path`` to :func:`previous_path` (checkpoints), so the
            last complete version survives a newest file that is later found corrupt.

    Raises:
        WriteError: on any OSError (e.g. ENOSPC) and on any other failure of ``write`` (``torch.save``
            on a full disk raises ``RuntimeError: [enforce fail ...]``); the temporary file is removed
            and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except Exception as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            why = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        else:  # torch.save on a full disk: "RuntimeError: [enforce fail ...] PytorchStreamWriter failed writing"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not (_low_on_space(path.parent) or any(w in first.lower() for w in ("writ", "enforce fail"))):
                raise  # not a write failure (e.g. an unpicklable object): a bug, keep its traceback
            why = "disk full" if _low_on_space(path.parent) else f"disk full or write error ({first[:160]})"
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


def previous_path(path) -> Path:
    """``ckpt.pt`` -> ``ckpt.prev.pt``: the last complete version kept by :func:`atomic_torch_save`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_torch_save(path, obj: Any) -> Path:
    """``torch.save`` atomically; the file it replaces is kept as :func:`previous_path`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), keep_previous=True)


def load_torch(path, map_location=None, warn: Callable[[str], None] = None) -> Optional[Any]:
    """Load a checkpoint written by :func:`atomic_torch_save`, falling back to its previous version.

    Returns the newest readable of ``path`` and :func:`previous_path` (``None`` when neither exists or
    both are unreadable). A corrupt or truncated file is reported in one line naming it (``warn``,
    default: ``warning: ...`` on stderr) and never raises.
    """
    import torch

    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    candidates = [p for p in (Path(path), previous_path(path)) if p.is_file()]
    for i, p in enumerate(candidates):
        try:
            return torch.load(p, map_location=map_location, weights_only=False)
        except Exception as err:  # truncated zip, unpickling error, EOF ...
            nxt = (f"resuming from the previous checkpoint {candidates[i + 1]}" if i + 1 < len(candidates)
                   else "starting this phase from scratch")
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            warn(f"checkpoint {p} is corrupt or truncated ({type(err).__name__}: {first}); {nxt}")
    return None


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

    def log(self, step: int, metrics: dict, store: bool = True) -> None:
        """Append ``metrics`` at ``step`` and pass them to the sinks (``store=False``: sinks only, e.g.
        per-layer densities for W&B that are not part of ``metrics.csv``)."""
        if store:
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
