"""Process-wide setup done once per run, before any :class:`~sparsebench.training.trainer.Trainer`:
device resolution, joining the torchrun process group, global cuDNN flags, and the stop signals.

Stop signals: SLURM sends ``SIGTERM`` before preemption (``SIGUSR1`` with ``--signal=USR1@<s>``).
Inside :func:`stop_signals` they only set a flag; the trainer checks :func:`stop_requested` at every
step boundary, writes a checkpoint and raises :class:`Preempted`, whose exit code is submitit's
requeue code (``submitit.local.local.LOCAL_REQUEUE_RETURN_CODE`` = 144). A rerun of the same command
resumes bit-exactly from that checkpoint.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from sparsebench.config.schemas import DEVICE_PATTERN, TrainerConfig
from sparsebench.core import distributed
from sparsebench.core.errors import ConfigError, SparsebenchError

REQUEUE_EXIT_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE: "this job wants to be requeued"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SparsebenchError):
    """Training stopped on a signal after writing a checkpoint; rerunning the command resumes it."""

    exit_code = REQUEUE_EXIT_CODE
    prefix = "stopped"


_stop = {"signal": None, "active": False}


def stop_requested() -> Optional[str]:
    """The name of the stop signal received inside :func:`stop_signals` (``"SIGTERM"``), else None."""
    return _stop["signal"]


@contextmanager
def stop_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Turn ``signals`` into a stop request (:func:`stop_requested`) for the block; the previous
    handlers are restored afterwards. A second signal while one is pending is ignored (the checkpoint is
    being written). Nested blocks share the outermost one's handlers and request (a table's cells, a
    run's training and result writing). Outside the main thread (where Python cannot install handlers)
    this does nothing."""
    if _stop["active"]:
        yield
        return
    _stop["signal"] = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _stop["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in signals}
    _stop["active"] = True
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop["signal"], _stop["active"] = None, False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ConfigError: CUDA requested on a machine without it.
    """
    if not DEVICE_PATTERN.match(str(name)):
        raise ConfigError(f"trainer.device={name!r}: unknown (allowed: auto, cpu, cuda, cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: CUDA is not available on this machine (use auto or cpu)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(name)


def setup_run(cfg: TrainerConfig) -> torch.device:
    """Resolve ``trainer.device``, join the process group when launched by torchrun (``WORLD_SIZE`` > 1)
    and set ``torch.backends.cudnn.benchmark`` from ``trainer.cudnn_benchmark`` (on CUDA).

    Returns:
        this rank's device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """
    device = distributed.init_from_env(resolve_device(cfg.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    return device
