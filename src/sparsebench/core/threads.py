"""Thread counts (torch, faiss, numba) set for a block of code and restored afterwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch


@contextmanager
def scoped_threads(n: Optional[int], get: Callable[[], int], set_: Callable[[int], None]) -> Iterator[int]:
    """Run the block with ``set_(n)`` in effect and restore the previous ``get()`` value on exit (also
    when the block raises). ``n = None`` or ``0`` leaves the setting alone.

    Yields:
        the thread count in effect inside the block.
    """
    old = get()
    if n:
        set_(int(n))
    try:
        yield get()
    finally:
        if get() != old:
            set_(old)


def torch_threads(n: Optional[int]) -> "contextmanager[int]":
    """:func:`scoped_threads` for torch's intra-op thread count (``torch.set_num_threads``)."""
    return scoped_threads(n, torch.get_num_threads, torch.set_num_threads)
