"""Structured-config schemas of the config groups ``dataset``, ``model``, ``trainer``, ``logger``, the
base of every ``method`` schema, and the top-level keys.

Schemas check ranges only. Names that select a registered strategy (``dataset.name``, ``model.arch``,
``model.activation``, ``trainer.optimizer``, ``trainer.schedule``, ``trainer.loss``, ``method.name``) are
checked against their registries by :func:`sparsebench.config.validation.validate`, which receives
them from :func:`sparsebench.api.validate`; this module imports nothing of sparsebench but core.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from sparsebench.config.checks import check, check_fraction

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # trainer.device values


@dataclass
class DatasetConfig:
    """``dataset`` group (names: :data:`sparsebench.data.registry.DATASETS`)."""

    name: str = "digits"
    root: str = field(default_factory=lambda: os.environ.get("SPARSEBENCH_DATA", "./data"))  # image files
    val_fraction: float = 0.1  # of the training split, seeded
    test_fraction: float = 0.2  # tabular only: held-out test share, seeded
    standardize: bool = True  # tabular: z-score with train statistics; images: mean/std normalise
    train_subset: Optional[int] = None  # keep the first N shuffled training samples (reduced scale)
    test_subset: Optional[int] = None
    pad_to: Optional[int] = None  # images: zero-pad to this side length (e.g. 32 for MNIST on a WRN)
    download: bool = False  # let torchvision download when a network is reachable
    verify_md5: bool = True  # check published md5 sums of the raw files where known
    split_seed: Optional[int] = None  # seed of the tabular split; None = the run's seed
    augment: str = "none"  # training-batch augmentation on the device (sparsebench.data.augment.AUGMENTATIONS)
    augment_pad: int = 4  # crop_flip*: pixels of zero padding before the random crop
    cutout: int = 8  # crop_flip_cutout: side of the zeroed square (DeVries & Taylor 2017, CIFAR-100)

    def __post_init__(self):
        check_fraction("dataset.val_fraction", self.val_fraction)
        check(self.augment_pad >= 0, "dataset.augment_pad", self.augment_pad, "must be >= 0")
        check(self.cutout >= 1, "dataset.cutout", self.cutout, "must be >= 1")
        check(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", self.test_fraction, "must be in (0, 1)")
        for k in ("train_subset", "test_subset", "pad_to"):
            v = getattr(self, k)
            check(v is None or v > 0, f"dataset.{k}", v, "must be a positive integer or null")


@dataclass
class ModelConfig:
    """``model`` group. ``arch`` selects the network family (:data:`sparsebench.models.registry.ARCHS`),
    whose own check validates the keys it reads (e.g. WideResNet depth 6n+4)."""

    name: str = "mlp"
    arch: str = "mlp"
    # MLP
    hidden: List[int] = field(default_factory=lambda: [100])
    activation: str = "relu"
    bias: bool = True
    # WideResNet (Zagoruyko & Komodakis 2016): depth = 6n + 4, widen factor k
    depth: int = 28
    width: int = 5
    dropout: float = 0.0
    # names (fnmatch patterns) of prunable weights that stay dense, e.g. ["conv1.weight"]
    dense_layers: List[str] = field(default_factory=list)

    def __post_init__(self):
        check(all(int(h) > 0 for h in self.hidden), "model.hidden", list(self.hidden), "widths must be positive")
        check_fraction("model.dropout", self.dropout)


@dataclass
class TrainerConfig:
    """``trainer`` group: optimisation and device. ``iterations`` (if set) overrides ``epochs``.

    ``optimizer``, ``schedule`` and ``loss`` name entries of the registries in
    :mod:`sparsebench.training.optim`.
    """

    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | step
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training (step)
    gamma: float = 0.1
    batch_size: int = 64
    epochs: int = 10
    iterations: Optional[int] = None
    loss: str = "cross_entropy"  # cross_entropy | mse (one-hot targets)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1  # epochs between evaluations
    checkpoint_every: int = 1  # epochs between checkpoints (0 = only at the end)
    checkpoint_every_steps: Optional[int] = None  # also checkpoint every N steps (mid-epoch; resumes exactly)
    eval_batch_size: int = 1000
    num_threads: Optional[int] = None  # torch.set_num_threads on CPU, for the run (restored after it)
    nan_check: bool = True  # stop with TrainingError on a non-finite loss
    # speed switches (issue 6); each must keep results within numerical tolerance
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no codegen, for quick checks)
    cudnn_benchmark: bool = False  # set once per run (sparsebench.training.runtime.setup_run)
    data_on_device: bool = True  # keep the tensors of small datasets on the training device
    progress: Optional[bool] = None  # tqdm progress bar; null = on when stderr is a terminal
    sparse_kernels: bool = False  # issue 14: masked nn.Linear -> truly sparse layers (sparsity/sparse_linear.py)
    # issue 14: with sparse_kernels, layers at or below this density go sparse, denser ones stay masked-dense
    # (null = the measured break-even for the batch size, sparsity.sparse_linear.default_max_density: 0.15 up to
    # batch 128, 0.11 at 1024; 1.0 = every masked layer)
    sparse_max_density: Optional[float] = None
    # issue 14: product backend of the sparse layers (sparsity.kernels.KERNELS: native, sparseprop, torch_csr; auto =
    # the first of them that runs here)
    sparse_backend: str = "auto"
    # issue 16: at the end of fit, restore the weights (and masks) of the evaluated epoch with the lowest loss on
    # this split (val | test; null = keep the last epoch), e.g. document 002's best-validation-loss model
    restore_best: Optional[str] = None
    # issue 16: Frankle & Carbin's early-stopping iteration: every N steps evaluate val (and test); the step of the
    # lowest validation loss and the test accuracy there join the final metrics (null = off)
    early_stop_every_steps: Optional[int] = None

    def __post_init__(self):
        check(math.isfinite(self.lr) and self.lr > 0, "trainer.lr", self.lr, "must be > 0")
        check(0 <= self.momentum < 1, "trainer.momentum", self.momentum, "must be in [0, 1)")
        check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0")
        check(self.gamma > 0, "trainer.gamma", self.gamma, "must be > 0 (the LR factor at each milestone)")
        check(all(0 < float(m) <= 1 for m in self.milestones), "trainer.milestones", list(self.milestones),
              "must be fractions of training in (0, 1]")
        check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        check(self.iterations is None or self.iterations >= 1, "trainer.iterations", self.iterations, "must be >= 1")
        check(self.eval_every >= 1, "trainer.eval_every", self.eval_every, "must be >= 1 (epochs between evaluations)")
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size, "must be >= 1")
        check(self.checkpoint_every >= 0, "trainer.checkpoint_every", self.checkpoint_every,
              "must be >= 0 (0 = only at the end)")
        check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
              "trainer.checkpoint_every_steps", self.checkpoint_every_steps, "must be >= 1 or null")
        check(self.num_threads is None or self.num_threads >= 1, "trainer.num_threads", self.num_threads,
              "must be >= 1 or null (keep the current count)")
        check(bool(self.compile_backend), "trainer.compile_backend", self.compile_backend, "must not be empty")
        check(bool(DEVICE_PATTERN.match(self.device)), "trainer.device", self.device,
              "unknown (allowed: auto, cpu, cuda, cuda:N)")
        check(self.sparse_max_density is None or 0 < self.sparse_max_density <= 1, "trainer.sparse_max_density",
              self.sparse_max_density, "must be in (0, 1] or null (the measured break-even)")
        check(self.early_stop_every_steps is None or self.early_stop_every_steps >= 1, "trainer.early_stop_every_steps",
              self.early_stop_every_steps, "must be >= 1 or null (off)")
        check(self.restore_best in (None, "val", "test"), "trainer.restore_best", self.restore_best,
              "unknown (allowed: null, val, test)")


@dataclass
class LoggerConfig:
    """``logger`` group: ``csv`` (always written) plus optional Weights & Biases."""

    name: str = "csv"
    wandb: bool = False
    project: str = "sparsebench"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    tags: List[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds wandb.init may wait for the service before falling back to offline
    log_artifacts: bool = False  # upload the final checkpoints (masks included) as a W&B artifact

    def __post_init__(self):
        check(self.mode in ("auto", "online", "offline", "disabled"), "logger.mode", self.mode,
              "unknown (allowed: auto, online, offline, disabled)")
        check(self.init_timeout > 0, "logger.init_timeout", self.init_timeout, "must be > 0 (seconds)")


@dataclass
class MethodConfig:
    """Base of every ``method`` schema (registered with ``METHODS.register(name, schema=...)``).

    Subclasses add their own keys. Only values that differ from the schema default enter the run hash
    (:mod:`sparsebench.config.identity`), so a new key must default to what the code did without it.
    """

    name: str = "dense"


@dataclass
class RunConfig:
    """The top-level keys (besides the groups)."""

    seed: int = 0
    out_dir: str = "runs"
    table: Optional[str] = None  # table ID this run belongs to (e.g. T003-imp)
    results_csv: Optional[str] = None  # also write the summary table here (atomically)
    resume: bool = True  # rerun of a finished run reports the stored result; interrupted runs resume
    lock_timeout: Optional[float] = None  # seconds to wait for another process on the same run (null: wait)

    def __post_init__(self):
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(bool(str(self.out_dir).strip()), "out_dir", self.out_dir, "must not be empty")
        check(self.lock_timeout is None or self.lock_timeout >= 0, "lock_timeout", self.lock_timeout,
              "must be >= 0 seconds or null (wait)")


GROUP_SCHEMAS = {"dataset": DatasetConfig, "model": ModelConfig, "trainer": TrainerConfig, "logger": LoggerConfig}
