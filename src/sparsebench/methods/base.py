"""Method strategy base class and the run context handed to it."""
from __future__ import annotations

import sys
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
from sparsebench.core.seeding import derive_seed


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

    def _seed(self, name: Optional[str]) -> int:
        """The run seed, or ``derive_seed(seed, name)`` for a named independent stream."""
        return int(self.cfg.seed) if name is None else derive_seed(self.cfg.seed, name)

    def new_model(self, seed_name: Optional[str] = None) -> nn.Module:
        """A freshly initialised model, seeded by the run seed, or by ``derive_seed(seed, seed_name)``
        for an independent draw (e.g. the random re-initialisation control of IMP)."""
        set_seed(self._seed(seed_name))
        return build_model(self.cfg.model, self.data.input_shape, self.data.num_classes)

    def masking(self, model: nn.Module) -> Masking:
        """The run's :class:`Masking` of ``model``; the latest one made is the one the summary's FLOPs
        columns describe (:meth:`Method.row`)."""
        self.last_masking = Masking(model, exclude=list(self.cfg.model.dense_layers))
        return self.last_masking

    def trainer(self, model: nn.Module, masking: Optional[Masking] = None, callbacks: Iterable[Callback] = (),
                prefix: str = "", seed_name: Optional[str] = None, start_step: int = 0, trainer_cfg=None,
                data: Optional[DataBundle] = None) -> Trainer:
        """A :class:`Trainer` on this run's data, device and metrics log (``trainer_cfg`` overrides the config,
        ``data`` the run's dataset, e.g. a method's own re-split).

        Its checkpoint file is ``checkpoints/<prefix or 'train'>.pt`` in the run directory, so every phase
        of a method (e.g. each IMP round) resumes on its own after an interruption.
        """
        return Trainer(trainer_cfg if trainer_cfg is not None else self.cfg.trainer, model,
                       data if data is not None else self.data, self.device,
                       masking=masking, callbacks=callbacks, seed=self._seed(seed_name),
                       metrics=self.metrics, prefix=prefix, start_step=start_step,
                       checkpoint=str(self.checkpoint_path(prefix.strip("/").replace("/", "_") or "train")),
                       augment=build_augmentation(self.cfg.dataset))

    def checkpoint_path(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    def save_state(self, name: str, state: dict) -> None:
        """Save a method's own state (e.g. the IMP round) atomically, flushing the metrics log first; the
        file it replaces is kept as ``<name>.prev.pt`` (:func:`~sparsebench.core.io.atomic_torch_save`)."""
        from sparsebench.core.distributed import is_main
        from sparsebench.core.io import atomic_torch_save

        if not is_main():
            return
        self.metrics.flush()
        atomic_torch_save(self.checkpoint_path(name), {**state, "metrics_rows": len(self.metrics.rows)})

    def load_state(self, name: str) -> Optional[dict]:
        """The state saved by :meth:`save_state`, or None (no file, or every version unreadable).

        The metrics log is not truncated here: the rows on disk were flushed at this save or at a later
        trainer checkpoint, which truncates to its own count when it is loaded. A corrupt or truncated
        newest file gives one ``warning:`` line naming it and the previous version is used
        (:func:`~sparsebench.core.io.load_torch`); then the phases after that version restart
        (:meth:`_restart_after`), so the result equals an uninterrupted run.
        """
        from sparsebench.core.io import load_torch

        bad = []

        def warn(line: str) -> None:
            bad.append(line)
            print(f"warning: {line}", file=sys.stderr, flush=True)

        path = self.checkpoint_path(name)
        state = load_torch(path, map_location=self.device, warn=warn)
        if bad:
            self._restart_after(path, state)
        return state

    def _restart_after(self, path: Path, state: Optional[dict]) -> None:
        """After a fallback from a corrupt ``path``: drop what was written after the version in use
        (``state``, from ``<name>.prev.pt``; None = no readable version): the corrupt file (so the next
        save does not keep it as the previous version), the trainer checkpoints written since (their
        phases restart) and the metrics rows logged since."""
        from sparsebench.core.distributed import is_main
        from sparsebench.core.io import previous_path

        prev = previous_path(path)
        since = prev.stat().st_mtime_ns if state is not None else -1
        if is_main():
            for ckpt in path.parent.glob("*.pt"):
                if ckpt == path or (ckpt != prev and ckpt.stat().st_mtime_ns >= since) or state is None:
                    ckpt.unlink(missing_ok=True)
        del self.metrics.rows[int(state["metrics_rows"]) if state is not None else 0:]


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
        """A summary row with the run's identity columns first and, last, ``inference_flops_rel`` and
        ``train_flops_rel`` of the latest masking at this moment (:func:`sparsebench.sparsity.flops.flops_columns`;
        1.0 without one)."""
        from sparsebench.sparsity.flops import flops_columns

        c = self.ctx.cfg
        masking = getattr(self.ctx, "last_masking", None)
        steps = -(-len(self.ctx.data.train) // int(c.trainer.batch_size)) if masking is not None else None
        flops = flops_columns(masking, tuple(self.ctx.data.input_shape) if masking is not None else (), c.method,
                              steps_per_epoch=steps)
        return {"method": c.method.name, "dataset": c.dataset.name, "model": c.model.name, "seed": int(c.seed),
                **values, **{k: v for k, v in flops.items() if k not in values}}
