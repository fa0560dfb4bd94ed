"""The training loop shared by every method.

The loop knows nothing of methods: pruning and sparse-training strategies act through a
:class:`~sparsebench.sparsity.masking.Masking` (attached to the optimizer) and :class:`Callback` hooks
(``on_after_backward`` sees the dense gradients before the step; ``on_step_end`` may change masks).
Data are in-memory tensors, shuffled with a seeded ``torch.Generator``, so the same seed on CPU gives
bit-identical metrics.
"""
from __future__ import annotations

import math
import random
import time
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.config import TrainerConfig
from sparsebench.data import DataBundle, Split
from sparsebench.core.errors import ConfigError, TrainingError
from sparsebench.core.io import MetricsLog
from sparsebench.sparsity.masking import Masking


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises ConfigError for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(name)


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
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Callback:
    """Hooks into :class:`Trainer`; override what you need. ``trainer.step`` is the global step."""

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


def build_optimizer(cfg: TrainerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainerConfig, total_steps: int):
    """Multiplicative LR factor per step: constant, cosine to 0, or step decay by ``gamma`` at milestones."""
    if cfg.schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
    if cfg.schedule == "step":
        marks = [int(m * total_steps) for m in cfg.milestones]
        return lambda s: cfg.gamma ** sum(s >= m for m in marks)
    return lambda s: 1.0


class Trainer:
    """Train ``model`` on ``data`` with the ``trainer`` config.

    Args:
        cfg: validated trainer config; ``iterations`` overrides ``epochs`` when set.
        model: the network (moved to ``device``).
        data: in-memory dataset; moved to the device when ``cfg.data_on_device``.
        masking: optional; attached to the optimizer so pruned weights stay exactly zero.
        callbacks: strategy hooks (see :class:`Callback`).
        seed: seeds the data order.
        metrics: long-format log; rows are named ``<prefix>train_loss``, ``<prefix>test_acc``, ...
        start_step: first step (the LR schedule continues from there; used for late rewinding).
        checkpoint: file for the full training state, written atomically every ``cfg.checkpoint_every``
            epochs and at the end; when it exists at :meth:`fit`, training resumes from it exactly.

    Raises:
        TrainingError: non-finite loss (names the step).
    """

    def __init__(self, cfg: TrainerConfig, model: nn.Module, data: DataBundle, device: torch.device,
                 masking: Optional[Masking] = None, callbacks: Iterable[Callback] = (), seed: int = 0,
                 metrics: Optional[MetricsLog] = None, prefix: str = "", start_step: int = 0,
                 checkpoint: Optional[str] = None):
        from sparsebench.core import distributed

        device = distributed.init_from_env(device)
        self.cfg, self.device, self.seed = cfg, device, seed
        self.model = model.to(device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.ddp = None
        if self.world > 1:
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
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
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
        factor = lr_lambda(cfg, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: factor(s + start_step))
        self.generator = torch.Generator().manual_seed(seed)
        self.step = start_step  # > 0 when resuming from a rewind point (LTH with k > 0)
        self.epoch = 0
        self.batch: Optional[tuple] = None  # (x, y) of the current step, for callbacks
        self.loss: Optional[torch.Tensor] = None
        self.time_in_callbacks = 0.0
        self.time_training = 0.0
        self.checkpoint = checkpoint
        self.last_checkpoint: Optional[str] = None

    # ------------------------------------------------------------------ pieces
    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "mse":
            return F.mse_loss(out, F.one_hot(y, out.shape[1]).to(out.dtype))
        return F.cross_entropy(out, y)

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
                "time_in_callbacks": self.time_in_callbacks}

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
        """Load ``self.checkpoint`` if it exists; returns whether training resumed."""
        import os

        if self.checkpoint and os.path.isfile(self.checkpoint):
            self.load_state_dict(torch.load(self.checkpoint, map_location=self.device, weights_only=False))
            self.last_checkpoint, self._ckpt_epoch = self.checkpoint, self.epoch
            return True
        return False

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
            version = self.masking.version if self.masking is not None else 0
            for cb in self.callbacks:
                cb.on_step_end(self)
            if self.ddp is not None and self.masking is not None and self.masking.version != version:
                from sparsebench.core.distributed import sync_from_rank0

                sync_from_rank0(self.masking, self.optimizer)
            self.time_in_callbacks += time.perf_counter() - t
        return self.loss

    def _log(self, metrics: Dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.log(self.step, {self.prefix + k: v for k, v in metrics.items()})

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, float]:
        """Train until ``total_steps``; returns final ``{val_acc, test_acc, test_loss, ...}``."""
        self.model.train()
        resumed = self.maybe_resume()
        if self.ddp is not None:
            from sparsebench.core.distributed import sync_from_rank0

            sync_from_rank0(self.masking, self.optimizer)  # masks set before training are identical anyway
        for cb in self.callbacks:
            if resumed:
                cb.on_resume(self)
            else:
                cb.on_train_start(self)
        train = self.data.train
        n, bs = len(train), self.cfg.batch_size
        t_start = time.perf_counter()
        while self.step < self.total_steps:
            perm = torch.randperm(n, generator=self.generator).to(train.x.device)
            running = torch.zeros((), device=self.device)
            steps = 0
            for i in range(0, n, bs):
                if self.step >= self.total_steps:
                    break
                idx = perm[i:i + bs]
                x, y = train.x[idx], train.y[idx]
                if x.device != self.device:
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                try:
                    running += self.train_step(x, y)
                except torch.cuda.OutOfMemoryError as err:
                    n_params = sum(p.numel() for p in self.model.parameters())
                    raise TrainingError(
                        f"out of GPU memory at step {self.step} with trainer.batch_size={self.cfg.batch_size} and "
                        f"model {type(self.model).__name__} ({n_params / 1e6:.1f}M parameters) on {self.device}; "
                        f"lower trainer.batch_size or enable trainer.amp") from err
                steps += 1
            self.epoch += 1
            if self.cfg.nan_check:
                self._check_finite(running)
            for cb in self.callbacks:
                cb.on_epoch_end(self)
            last = self.step >= self.total_steps
            if last or self.epoch % self.cfg.eval_every == 0:
                m = {"train_loss": float(running) / max(1, steps), "lr": self.scheduler.get_last_lr()[0]}
                m.update({f"val_{k}": v for k, v in self.evaluate(self.data.val).items()})
                m.update({f"test_{k}": v for k, v in self.evaluate(self.data.test).items()})
                if self.masking is not None:
                    m["density"] = self.masking.density()
                self._log(m)
            every = self.cfg.checkpoint_every
            if self.checkpoint and (last or (every and self.epoch % every == 0)):
                self.save_checkpoint()
        self.time_training = time.perf_counter() - t_start
        final = {f"val_{k}": v for k, v in self.evaluate(self.data.val).items()}
        final.update({f"test_{k}": v for k, v in self.evaluate(self.data.test).items()})
        final["train_seconds"] = self.time_training
        final["steps"] = self.step
        return final
