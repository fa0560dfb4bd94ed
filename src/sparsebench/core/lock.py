"""One process per run directory: an exclusive lock (``filelock``) held for the whole run.

Two processes on the same config share a run directory (a SLURM requeue while the old job still runs,
two overlapping sweeps). Without a lock both train and ``metrics.csv`` loses rows. With it the second
process waits (``lock_timeout=null``, the default) and then finds the run finished (reports it) or
interrupted (resumes it), or gives up after ``lock_timeout`` seconds (0 = at once) with one line naming
the holder. ``<run_dir>/.lock`` is an OS-level lock (``fcntl``), released by the kernel when the holder
dies, so a killed job never leaves a stale lock; ``<run_dir>/.lock.holder`` names the holder
(``pid`` on ``host`` since ``time``) for the messages.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from filelock import FileLock, Timeout

from sparsebench.core.errors import SparsebenchError
from sparsebench.core.io import umask_mode


class RunLockedError(SparsebenchError):
    """Another process holds the run directory's lock (the message names it)."""


def holder(run_dir: Path) -> str:
    """``pid 123 on host (since 2024-01-01 12:00:00)``, from ``.lock.holder`` (``unknown process`` if none)."""
    try:
        info = json.loads((Path(run_dir) / ".lock.holder").read_text())
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "an unknown process"


@contextmanager
def run_lock(run_dir, timeout: Optional[float] = None,
             say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> Iterator[None]:
    """Hold the exclusive lock of ``run_dir`` for the block.

    Args:
        run_dir: the run directory (must exist).
        timeout: seconds to wait for another holder; ``None`` waits as long as it takes, 0 not at all.
        say: gets one line when the lock is busy (before waiting).

    Raises:
        RunLockedError: the lock is still held after ``timeout`` seconds (names the holder).
    """
    run_dir = Path(run_dir)
    lock = FileLock(str(run_dir / ".lock"), mode=umask_mode())
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder(run_dir)
        if timeout is not None and timeout <= 0:
            raise RunLockedError(f"run directory {run_dir} is in use by {who}; not starting a second copy "
                                 f"(lock_timeout=0)") from None
        say(f"run directory {run_dir} is in use by {who}; waiting for it to finish"
            + (f" (at most {timeout:g} s)" if timeout is not None else ""))
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise RunLockedError(f"run directory {run_dir} is still in use by {holder(run_dir)} after "
                                 f"lock_timeout={timeout:g} s") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            (run_dir / ".lock.holder").write_text(json.dumps(info) + "\n")
        except OSError:
            pass
        yield
    finally:
        lock.release()

