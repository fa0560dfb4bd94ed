"""Seeds and random-number-generator state: global seeding, named seed derivation, RNG snapshots.

:func:`set_seed` seeds Python, NumPy and torch; :func:`rng_state` / :func:`set_rng_state` snapshot and
restore all of them (checkpoints resume bit-exactly). :func:`derive_seed` gives an independent,
reproducible seed per named purpose (``derive_seed(seed, "mask_init")``) in place of magic offsets.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for the purpose ``name`` under the run seed ``seed``.

    The first 8 bytes of ``sha256(f"{seed}:{name}")`` (big endian), top bit cleared, so the value is
    the same on every platform and Python version (unlike ``hash()``) and fits ``torch.manual_seed``.

    Args:
        seed: the run's seed (any int).
        name: the purpose, e.g. ``"mask_init"``; different names give unrelated seeds.
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) global RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
