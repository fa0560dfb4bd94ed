"""Method strategy base class and the run context handed to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from sparsebench.data import DataBundle, load_dataset
from sparsebench.data.augment import build_augmentation
from sparsebench.core.io import MetricsLog
from sparsebench.sparsity.masking import Masking
from sparsebench.models import build_model
from sparsebench.core.seeding import set_seed
from sparsebench.training.callbacks import Callback
from sparsebench.training.trainer import Trainer


@dataclass
class RunContext:
    """Everything a method needs: validated config, run directory, device, metrics log, data."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    metrics: MetricsLog
    _data: Optional[DataBundle] = field(default=None, repr=False)

    @property
    def data(self) -> DataBundle:
        """The dataset, loaded on first use (seeded split)."""
        if self._data is None:
            self._data = load_dataset(self.cfg.dataset, seed=int(self.cfg.seed))
        return self._data

    def new_model(self, seed_offset: int = 0) -> nn.Module:
        """A freshly initialised model; the init is seeded by ``seed + seed_offset``."""
        set_seed(int(self.cfg.seed) + seed_offset)
        return build_model(self.cfg.model, self.data.input_shape, self.data.num_classes)

    def masking(self, model: nn.Module) -> Masking:
        return Masking(model, exclude=list(self.cfg.model.dense_layers))

    def trainer(self, model: nn.Module, masking: Optional[Masking] = None, callbacks: Iterable[Callback] = (),
                prefix: str = "", seed_offset: int = 0, start_step: int = 0, trainer_cfg=None,
                data: Optional[DataBundle] = None) -> Trainer:
        """A :class:`Trainer` on this run's data, device and metrics log (``trainer_cfg`` overrides the config,
        ``data`` the run's dataset, e.g. a method's own re-split).

        Its checkpoint file is ``checkpoints/<prefix or 'train'>.pt`` in the run directory, so every phase
        of a method (e.g. each IMP round) resumes on its own after an interruption.
        """
        return Trainer(trainer_cfg if trainer_cfg is not None else self.cfg.trainer, model,
                       data if data is not None else self.data, self.device,
                       masking=masking, callbacks=callbacks, seed=int(self.cfg.seed) + seed_offset,
                       metrics=self.metrics, prefix=prefix, start_step=start_step,
                       checkpoint=str(self.checkpoint_path(prefix.strip("/").replace("/", "_") or "train")),
                       augment=build_augmentation(self.cfg.dataset))

    def checkpoint_path(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    def save_state(self, name: str, state: dict) -> None:
        """Save a method's own state (e.g. the IMP round) atomically, flushing the metrics log first."""
        from sparsebench.core.distributed import is_main
        from sparsebench.core.io import atomic_torch_save

        if not is_main():
            return
        self.metrics.flush()
        atomic_torch_save(self.checkpoint_path(name), {**state, "metrics_rows": len(self.metrics.rows)})

    def load_state(self, name: str) -> Optional[dict]:
        """The state saved by :meth:`save_state`, or None.

        The metrics log is not truncated here: the rows on disk were flushed at this save or at a later
        trainer checkpoint, which truncates to its own count when it is loaded.
        """
        path = self.checkpoint_path(name)
        if not path.is_file():
            return None
        return torch.load(path, map_location=self.device, weights_only=False)


class Method:
    """A method strategy: ``run()`` trains/prunes and returns its summary table (one row per result).

    Subclasses register with ``@METHODS.register("name", schema=TheirConfig)``.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cfg = ctx.cfg.method

    def run(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def row(self, **values) -> dict:
        """A summary row with the run's identity columns first."""
        c = self.ctx.cfg
        return {"method": c.method.name, "dataset": c.dataset.name, "model": c.model.name, "seed": int(c.seed),
                **values}
