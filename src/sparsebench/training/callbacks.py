"""The hook interface between the training loop and the strategies that act during training."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sparsebench.training.trainer import Trainer


class Callback:
    """Hooks into :class:`~sparsebench.training.trainer.Trainer`; override what you need.

    ``trainer.step`` is the global step; ``on_after_backward`` sees the dense gradients before the
    optimizer step; ``on_step_end`` may change masks (the trainer then re-syncs them across ranks).
    ``state_dict`` / ``load_state_dict`` make a callback resumable with the trainer's checkpoint.
    """

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_after_backward(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer") -> None: ...

    def on_resume(self, trainer: "Trainer") -> None:
        """Called instead of ``on_train_start`` when training continues from a checkpoint (after
        :meth:`load_state_dict`)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
