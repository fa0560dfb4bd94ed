"""Progress reporting by one convention (``trainer.progress``; issue 12).

``trainer.progress``: ``true`` / ``false``, or ``null`` (the default) = on when stderr is a terminal;
only rank 0 reports. The trainer shows a tqdm bar over its steps
(:meth:`sparsebench.training.trainer.Trainer._progress_bar`); coarser loops (IMP rounds, LPA stages,
table cells) use :class:`Progress`: a tqdm bar on stderr when progress is on and stderr is a terminal,
otherwise one plain line per finished item (what a log file of a cluster job wants). Reporting never
changes a number or a metrics row.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional


def progress_on(setting: Optional[bool]) -> bool:
    """Whether progress is shown: ``setting`` (``trainer.progress``), ``None`` = stderr is a terminal;
    never on a rank other than 0."""
    from sparsebench.core.distributed import is_main

    on = setting if setting is not None else sys.stderr.isatty()
    return bool(on) and is_main()


class Progress:
    """Progress over ``total`` items: a tqdm bar (``unit`` per item, starting at ``initial``) when
    :func:`progress_on` and stderr is a terminal, else one line per item through ``say``.

    Args:
        say: where the per-item lines go without a bar (default ``print`` to stdout; ``None``: nowhere).
    """

    def __init__(self, total: int, desc: str, setting: Optional[bool] = None, unit: str = "it",
                 initial: int = 0, say: Optional[Callable[[str], None]] = print):
        self.say = say
        self.bar = None
        if progress_on(setting) and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def start(self, item: str) -> None:
        """An item begins: the bar shows ``item`` as its postfix (no line without a bar)."""
        if self.bar is not None:
            self.bar.set_postfix_str(item)

    def done(self, line: Optional[str] = None) -> None:
        """An item finished: advance the bar (``line`` as its postfix), or print ``line`` (if any)."""
        if self.bar is not None:
            if line:
                self.bar.set_postfix_str(line.strip(), refresh=False)
            self.bar.update(1)
        elif self.say is not None and line is not None:
            self.say(line)

    def write(self, line: str) -> None:
        """A message beside the progress (printed above the bar, or through ``say``)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.say is not None:
            self.say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
