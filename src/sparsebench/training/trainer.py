"""The training loop shared by every method.

The loop knows nothing of methods: pruning and sparse-training strategies act through a
:class:`~sparsebench.sparsity.masking.Masking` (attached to the optimizer) and :class:`Callback` hooks
(``on_after_backward`` sees the dense gradients before the step; ``on_step_end`` may change masks).
Data are in-memory tensors, shuffled with a seeded ``torch.Generator``, so the same seed on CPU gives
bit-identical metrics. Process-wide setup (device, torchrun process group, cuDNN flags) is not done
here but once per run by :func:`sparsebench.training.runtime.setup_run`.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from sparsebench.config.schemas import TrainerConfig
from sparsebench.core.seeding import rng_state, set_rng_state
from sparsebench.data.registry import DataBundle, Split
from sparsebench.data.augment import augment_generator
from sparsebench.core.errors import TrainingError
from sparsebench.core.io import MetricsLog, load_torch
from sparsebench.sparsity.masking import Masking
from sparsebench.training.callbacks import Callback
from sparsebench.training.optim import LOSSES, build_optimizer, build_scheduler
from sparsebench.training.runtime import Preempted, stop_requested


class Trainer:
    """Train ``model`` on ``data`` with the ``trainer`` config.

    Args:
        cfg: validated trainer config; ``iterations`` overrides ``epochs`` when set.
        model: the network (moved to ``device``).
        device: this rank's device, as returned by :func:`~sparsebench.training.runtime.setup_run`; under
            torchrun (process group joined) the model is wrapped in DistributedDataParallel.
        data: in-memory dataset; moved to the device when ``cfg.data_on_device``.
        masking: optional; attached to the optimizer so pruned weights stay exactly zero. Under
            ``cfg.sparse_kernels`` its Linear layers of density at most ``cfg.sparse_max_density`` (None: the
            break-even measured for ``cfg.batch_size``, ``default_max_density``) are first converted to truly sparse layers
            (:func:`~sparsebench.sparsity.sparse_linear.sparsify_for_training`; ``self.sparse``) and only
            the ones left masked-dense stay in ``self.masking``.
        callbacks: strategy hooks (see :class:`Callback`). Under ``cfg.sparse_kernels`` each must define
            ``adopt_sparse_layers(conversion)`` (the dynamic sparse updater does; it then updates the
            sparse layers' storage), others are refused with a ConfigError.
        seed: seeds the data order.
        metrics: long-format log; rows are named ``<prefix>train_loss``, ``<prefix>test_acc``, ...
        start_step: first step (the LR schedule continues from there; used for late rewinding).
        checkpoint: file for the full training state, written atomically every ``cfg.checkpoint_every``
            epochs, every ``cfg.checkpoint_every_steps`` steps (mid-epoch), on a stop signal
            (:func:`~sparsebench.training.runtime.stop_signals`) and at the end; when it exists at
            :meth:`fit`, training resumes from it exactly (a corrupt newest file falls back to the
            previous one, :func:`~sparsebench.core.io.load_torch`). Wall time accumulates across resumes.
        augment: optional :class:`~sparsebench.data.augment.Augmentation` applied on the device to every
            training batch (never at evaluation); its generator's state is part of the checkpoint.

    Raises:
        TrainingError: non-finite loss (names the step).
        Preempted: a stop signal arrived; raised at the next step boundary after the checkpoint is written.
    """

    def __init__(self, cfg: TrainerConfig, model: nn.Module, data: DataBundle, device: torch.device,
                 masking: Optional[Masking] = None, callbacks: Iterable[Callback] = (), seed: int = 0,
                 metrics: Optional[MetricsLog] = None, prefix: str = "", start_step: int = 0,
                 checkpoint: Optional[str] = None, augment=None):
        from sparsebench.core import distributed

        self.cfg, self.device, self.seed = cfg, device, seed
        self.model = model.to(device)
        self.sparse = None  # issue 14: masked Linear layers trained truly sparse (trainer.sparse_kernels)
        if cfg.sparse_kernels and masking is not None:
            from sparsebench.core.errors import ConfigError
            from sparsebench.sparsity.sparse_linear import default_max_density, sparsify_for_training

            callbacks = list(callbacks)
            refused = [type(cb).__name__ for cb in callbacks if not hasattr(cb, "adopt_sparse_layers")]
            if refused:
                raise ConfigError(f"trainer.sparse_kernels=true: {', '.join(refused)} would act on the replaced "
                                  f"dense layers (only callbacks with adopt_sparse_layers, such as the dynamic "
                                  f"sparse updater, run in this mode); set trainer.sparse_kernels=false")
            limit = default_max_density(cfg.batch_size) if cfg.sparse_max_density is None else cfg.sparse_max_density
            self.sparse = sparsify_for_training(self.model, masking, max_density=float(limit),  # per layer
                                                kernels=cfg.sparse_backend)
            masking = self.sparse.masking  # the layers that stayed masked-dense (or None)
            for cb in callbacks:  # e.g. DSTUpdater: update the converted layers through their sparse storage
                cb.adopt_sparse_layers(self.sparse)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.ddp = None
        if self.world > 1:
            if self.sparse is not None:  # structure buffers: synced by sync_from_rank0 only (int16 col; no per-step copy)
                from sparsebench.sparsity.sparse_linear import structure_buffer_names

                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.model, structure_buffer_names(self.sparse))
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.data = data.to(device) if cfg.data_on_device else data
        self.masking = masking
        self.callbacks: List[Callback] = list(callbacks)
        self.metrics, self.prefix = metrics, prefix
        # speed switches (issue 6): each keeps results within numerical tolerance and runs on CPU too
        self.channels_last = bool(cfg.channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # masks are applied in place around optimizer steps, never inside forward, so the compiled
        # graph stays valid when masks change
        self.forward = (torch.compile(self.ddp or self.model, backend=cfg.compile_backend) if cfg.compile
                        else (self.ddp or self.model))
        if not cfg.data_on_device and device.type == "cuda":
            data = DataBundle(data.name, data.kind, Split(data.train.x.pin_memory(), data.train.y.pin_memory()),
                              data.val, data.test, data.num_classes)
            self.data = data
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        if masking is not None:
            masking.attach(self.optimizer)
            masking.apply_()
        n = len(self.data.train)
        self.steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        self.total_steps = cfg.iterations or cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps, start_step)
        self.generator = torch.Generator().manual_seed(seed)
        # training-batch augmentation (sparsebench.data.augment), drawn from its own generator on the device
        self.augment = augment
        self.aug_generator = augment_generator(seed, device) if augment is not None else None
        self.best = {"best_val_acc": float("nan"), "best_epoch": 0, "test_acc_at_best_val": float("nan")}
        self.best_loss = {"best_loss": float("inf"), "best_loss_epoch": 0}  # trainer.restore_best
        self._best_state: Optional[dict] = None  # CPU copy of the model at best_loss_epoch (restore_best only)
        self.early_stop = {"early_stop_step": 0, "early_stop_val_loss": float("inf"), "early_stop_val_acc": float("nan"),
                           "early_stop_test_acc": float("nan")}  # trainer.early_stop_every_steps
        self.step = start_step  # > 0 when resuming from a rewind point (LTH with k > 0)
        self.epoch = 0
        self.batch: Optional[tuple] = None  # (x, y) of the current step, for callbacks
        self.loss: Optional[torch.Tensor] = None
        self.time_in_callbacks = 0.0
        self.time_training = 0.0  # seconds, accumulated over every process that trained this phase
        self._time_before = 0.0  # of them, the seconds of earlier processes (from the checkpoint)
        self._t_start: Optional[float] = None
        self._epoch_pos: Optional[dict] = None  # mid-epoch position of a checkpoint (see fit)
        self.checkpoint = checkpoint
        self.last_checkpoint: Optional[str] = None

    # ------------------------------------------------------------------ pieces
    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The ``trainer.loss`` of logits ``out (N, C)`` and labels ``y (N,)`` (registry ``LOSSES``)."""
        return LOSSES.get(self.cfg.loss)(out, y)

    @torch.no_grad()
    def evaluate(self, split: Split) -> Dict[str, float]:
        """Mean loss and accuracy of the current model on ``split`` (eval mode, batched)."""
        if len(split) == 0:
            return {"loss": float("nan"), "acc": float("nan")}
        was = self.model.training
        self.model.eval()
        total_loss, correct = 0.0, 0
        bs = self.cfg.eval_batch_size
        for i in range(0, len(split), bs):
            x = split.x[i:i + bs].to(self.device, non_blocking=True)
            y = split.y[i:i + bs].to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
                out = self.model(x).float()
            total_loss += float(self.loss_fn(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
        self.model.train(was)
        return {"loss": total_loss / len(split), "acc": correct / len(split)}

    def evaluate_splits(self, splits: Iterable[str] = ("val", "test")) -> Dict[str, float]:
        """:meth:`evaluate` on each named split of ``self.data`` (``train`` / ``val`` / ``test``), in order:
        ``{<split>_loss, <split>_acc, ...}``."""
        out: Dict[str, float] = {}
        for s in splits:
            out.update({f"{s}_{k}": v for k, v in self.evaluate(getattr(self.data, s)).items()})
        return out

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            last = (f"last good checkpoint: {self.last_checkpoint} (epoch {self._ckpt_epoch})" if self.last_checkpoint
                    else "no checkpoint written yet")
            raise TrainingError(f"non-finite training loss ({float(loss)}) at step {self.step}; stopping; {last} "
                                f"(lower trainer.lr or check the data)")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly: model (with masks), optimizer, LR schedule, step,
        data-order generator, global RNG states, callback states and the metrics row count."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "generator": self.generator.get_state(), "rng": rng_state(),
                "callbacks": [cb.state_dict() for cb in self.callbacks],
                "metrics_rows": len(self.metrics.rows) if self.metrics is not None else 0,
                "time_in_callbacks": self.time_in_callbacks, "best": dict(self.best),
                "aug_generator": self.aug_generator.get_state() if self.aug_generator is not None else None,
                "time_training": self._elapsed(), "epoch_pos": self._epoch_pos, "early_stop": dict(self.early_stop),
                **({"best_loss": dict(self.best_loss), "best_state": self._best_state} if self.cfg.restore_best else {})}

    def _elapsed(self) -> float:
        """Training seconds so far: earlier processes' (checkpoint) plus this one's."""
        now = time.perf_counter() - self._t_start if self._t_start is not None else 0.0
        return self._time_before + now

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        for cb, cs in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cs)
        if self.metrics is not None:
            del self.metrics.rows[int(state["metrics_rows"]):]
        self.time_in_callbacks = float(state.get("time_in_callbacks", 0.0))
        self.best = dict(state.get("best", self.best))
        if self.aug_generator is not None and state.get("aug_generator") is not None:
            self.aug_generator.set_state(state["aug_generator"].cpu())
        self._time_before = float(state.get("time_training", 0.0))
        self._epoch_pos = state.get("epoch_pos")
        self.early_stop = dict(state.get("early_stop", self.early_stop))
        if self.cfg.restore_best:
            self.best_loss = dict(state.get("best_loss", self.best_loss))
            self._best_state = state.get("best_state")

    _ckpt_epoch = 0

    def save_checkpoint(self) -> None:
        """Flush the metrics log, then write the checkpoint atomically (a full disk keeps the old one)."""
        from sparsebench.core.distributed import is_main
        from sparsebench.core.io import atomic_torch_save

        if is_main():
            if self.metrics is not None:
                self.metrics.flush()
            atomic_torch_save(self.checkpoint, self.state_dict())
        self.last_checkpoint, self._ckpt_epoch = self.checkpoint, self.epoch

    def maybe_resume(self) -> bool:
        """Load ``self.checkpoint`` (or, when it is corrupt or truncated, its previous version) if it
        exists; returns whether training resumed. With no readable file this phase's metrics rows
        (its ``prefix``, or all rows after ``start_step`` without one) are dropped and it starts over."""
        from sparsebench.core.io import previous_path

        if not self.checkpoint:
            return False
        existed = any(p.is_file() for p in (Path(self.checkpoint), previous_path(self.checkpoint)))
        state = load_torch(self.checkpoint, map_location=self.device) if existed else None
        if state is None:
            # rows of this phase on disk without a checkpoint (a kill between the metrics flush and the
            # phase's first checkpoint, or an unreadable one) would be logged twice: drop them
            if self.metrics is not None:
                keep = (lambda r: not r[1].startswith(self.prefix)) if self.prefix else (lambda r: r[0] <= self.step)
                self.metrics.rows[:] = [r for r in self.metrics.rows if keep(r)]
            return False
        self.load_state_dict(state)
        self.last_checkpoint, self._ckpt_epoch = self.checkpoint, self.epoch
        return True

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batch = (x, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ddp is not None:  # this rank's shard of the global batch
            x, y = x[self.rank::self.world], y[self.rank::self.world]
            self.batch = (x, y)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            loss = self.loss_fn(self.forward(x), y)
        if self.cfg.nan_check and self.device.type == "cpu":
            self._check_finite(loss.detach())
        loss.backward()
        self.loss = loss.detach()
        if self.callbacks:
            t = time.perf_counter()
            for cb in self.callbacks:
                cb.on_after_backward(self)
            self.time_in_callbacks += time.perf_counter() - t
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.callbacks:
            t = time.perf_counter()
            version = self._topology_version()
            for cb in self.callbacks:
                cb.on_step_end(self)
            if self.ddp is not None and self._topology_version() != version:
                from sparsebench.core.distributed import sync_from_rank0

                sync_from_rank0(self.masking, self.optimizer, self.sparse)
            self.time_in_callbacks += time.perf_counter() - t
        return self.loss

    def _topology_version(self) -> tuple:
        """Versions of the masks and of the sparse layers' structures (they move when rank-local data
        changed a topology; the ranks are then synced)."""
        return (self.masking.version if self.masking is not None else 0,
                self.sparse.version if self.sparse is not None else 0)

    def _log(self, metrics: Dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.log(self.step, {self.prefix + k: v for k, v in metrics.items()})

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, float]:
        """Train until ``total_steps``; returns final ``{val_acc, test_acc, test_loss, ...}`` and the best
        evaluated epoch by validation accuracy: ``best_val_acc``, ``best_epoch``, ``test_acc_at_best_val``."""
        self.model.train()
        resumed = self.maybe_resume()
        if self.ddp is not None:
            from sparsebench.core.distributed import sync_from_rank0

            sync_from_rank0(self.masking, self.optimizer, self.sparse)  # identical anyway before training
        for cb in self.callbacks:
            if resumed:
                cb.on_resume(self)
            else:
                cb.on_train_start(self)
        self._warn_empty_layers()
        train = self.data.train
        n, bs = len(train), self.cfg.batch_size
        self._t_start = time.perf_counter()
        bar = self._progress_bar()
        try:
            self._loop(train, n, bs, bar)
        finally:
            if bar is not None:
                bar.close()
        self.time_training = self._elapsed()
        if self.cfg.restore_best and self._best_state is not None:  # the best evaluated epoch's weights and masks
            self.model.load_state_dict(self._best_state)
        final = self.evaluate_splits(("val", "test"))
        final["train_seconds"] = self.time_training
        final["steps"] = self.step
        final.update(self.best)  # best validation epoch beside the final one (NaN / 0 without a val split)
        if self.cfg.early_stop_every_steps:
            final.update(self.early_stop)
        if self.cfg.restore_best:  # final metrics above are those of the restored epoch
            final.update(self.best_loss, restored_epoch=self.best_loss["best_loss_epoch"] if self._best_state else self.epoch)
        return final

    def _progress_bar(self):
        """A tqdm bar over the steps (``trainer.progress``; null = when stderr is a terminal; rank 0 only:
        :func:`~sparsebench.core.progress.progress_on`)."""
        from sparsebench.core.progress import progress_on

        if not progress_on(self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.prefix.rstrip("/") or "train",
                    unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)

    def _warn_empty_layers(self) -> None:
        """One warning line per masked layer with no active weight (the network is disconnected there)."""
        if self.masking is None:
            return
        for name, (active, total) in self.masking.counts().items():
            if total and not active:
                print(f"warning: layer {name} has no active weight (density 0 of {total}): the network is "
                      f"disconnected there and its outputs do not depend on the input", file=sys.stderr, flush=True)

    def _track_early_stop(self) -> None:
        """Evaluate val and test now; keep the step with the lowest validation loss (Frankle & Carbin 2019,
        Section 2: the early-stopping iteration is that of minimum validation loss, evaluated every 100
        iterations; its test accuracy is the one they report). Ties keep the earlier step; NaN never wins."""
        m = self.evaluate_splits(("val", "test"))
        if m["val_loss"] < self.early_stop["early_stop_val_loss"]:
            self.early_stop = {"early_stop_step": self.step, "early_stop_val_loss": m["val_loss"],
                               "early_stop_val_acc": m["val_acc"], "early_stop_test_acc": m["test_acc"]}

    def _step_boundary(self, gen_state, i: int, running: torch.Tensor, steps: int) -> None:
        """After a step: checkpoint mid-epoch every ``checkpoint_every_steps`` steps or on a stop signal
        (then raise :class:`Preempted`). The checkpoint holds the epoch's position (the data-order
        generator before this epoch's permutation, the next batch index, the running loss), so the
        resumed run continues the same epoch bit-exactly."""
        sig = stop_requested()
        every = self.cfg.checkpoint_every_steps
        due = bool(every) and self.step % every == 0 and self.step < self.total_steps
        if not (sig or due) or not self.checkpoint:
            if sig:
                raise Preempted(f"{sig} at step {self.step}; no checkpoint file configured")
            return
        self._epoch_pos = {"generator": gen_state, "i": i, "running": running.detach().cpu().clone(), "steps": steps}
        try:
            self.save_checkpoint()
        finally:
            self._epoch_pos = None
        if sig:
            raise Preempted(f"{sig} at step {self.step} (epoch {self.epoch + 1}); checkpoint "
                            f"{self.checkpoint} written; rerun the same command to resume")

    def _loop(self, train, n: int, bs: int, bar) -> None:
        while self.step < self.total_steps or self._epoch_pos is not None:  # (stopped after the last step)
            pos, self._epoch_pos = self._epoch_pos, None
            if pos is not None:  # resumed mid-epoch: redraw this epoch's permutation, continue at batch i
                self.generator.set_state(pos["generator"])
            gen_state = self.generator.get_state()
            perm = torch.randperm(n, generator=self.generator).to(train.x.device)
            running = pos["running"].to(self.device) if pos is not None else torch.zeros((), device=self.device)
            steps = pos["steps"] if pos is not None else 0
            for i in range(pos["i"] if pos is not None else 0, n, bs):
                if self.step >= self.total_steps:
                    break
                idx = perm[i:i + bs]
                x, y = train.x[idx], train.y[idx]
                if x.device != self.device:
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.augment is not None:  # training batches only; evaluate() never augments
                    x = self.augment(x, self.aug_generator)
                try:
                    running += self.train_step(x, y)
                except torch.cuda.OutOfMemoryError as err:
                    n_params = sum(p.numel() for p in self.model.parameters())
                    raise TrainingError(
                        f"out of GPU memory at step {self.step} with trainer.batch_size={self.cfg.batch_size} and "
                        f"model {type(self.model).__name__} ({n_params / 1e6:.1f}M parameters) on {self.device}; "
                        f"lower trainer.batch_size or enable trainer.amp") from err
                steps += 1
                if bar is not None:
                    bar.update(1)
                if self.cfg.early_stop_every_steps and self.step % self.cfg.early_stop_every_steps == 0:
                    self._track_early_stop()
                self._step_boundary(gen_state, i + bs, running, steps)
            self.epoch += 1
            if self.cfg.nan_check:
                self._check_finite(running)
            for cb in self.callbacks:
                cb.on_epoch_end(self)
            last = self.step >= self.total_steps
            if last or self.epoch % self.cfg.eval_every == 0:
                m = {"train_loss": float(running) / max(1, steps), "lr": self.scheduler.get_last_lr()[0]}
                m.update(self.evaluate_splits(("val", "test")))
                if self.sparse is not None or self.masking is not None:
                    m["density"] = (self.sparse or self.masking).density()
                if self.masking is not None and self.metrics is not None and self.metrics.sinks:  # W&B only
                    self.metrics.log(self.step, {f"{self.prefix}density/{k}": a / t for k, (a, t)
                                                 in self.masking.counts().items()}, store=False)
                if bar is not None:
                    bar.set_postfix(loss=m["train_loss"], val_acc=m["val_acc"], refresh=False)
                if m["val_acc"] > self.best["best_val_acc"] or (math.isnan(self.best["best_val_acc"])
                                                               and not math.isnan(m["val_acc"])):
                    self.best = {"best_val_acc": m["val_acc"], "best_epoch": self.epoch,
                                 "test_acc_at_best_val": m["test_acc"]}
                sel = m.get(f"{self.cfg.restore_best}_loss", float("nan")) if self.cfg.restore_best else float("nan")
                if sel < self.best_loss["best_loss"]:  # NaN (empty split) never selects
                    self.best_loss = {"best_loss": sel, "best_loss_epoch": self.epoch}
                    self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                self._log(m)
            every = self.cfg.checkpoint_every
            if self.checkpoint and (last or (every and self.epoch % every == 0)):
                self.save_checkpoint()
