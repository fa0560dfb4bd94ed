"""Torch intra-op thread count set for a block of code and restored afterwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch


@contextmanager
def torch_threads(n: Optional[int]) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)``; the previous count is restored on exit.

    Args:
        n: thread count (>= 1); ``None`` or 0 leaves the current count unchanged.

    Yields:
        the thread count in effect inside the block.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
