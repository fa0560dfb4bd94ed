"""Structured-config schemas and validation for every config group.

Hydra composes the YAML groups under ``conf/``; :func:`validate` then merges each group onto its
dataclass schema (unknown key or wrong type -> :class:`ConfigError`) and instantiates it, so the
``__post_init__`` range checks run (density outside (0, 1], negative lr, WRN depth not 6n+4, ...).
Every message starts with the dotted key it is about.

Per-method schemas are registered with the method (``METHODS.register(name, schema=...)``) and
must subclass :class:`MethodConfig`; a new key must default to a no-op so old run hashes stay valid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsebench.core.errors import ConfigError


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def check_density(key: str, value: float) -> None:
    """Raise :class:`ConfigError` unless ``0 < value <= 1``."""
    _check(0.0 < float(value) <= 1.0, key, value, "density must be in (0, 1]")


def check_fraction(key: str, value: float, closed_right: bool = False) -> None:
    """Raise unless ``0 <= value < 1`` (or ``<= 1`` when ``closed_right``)."""
    ok = 0.0 <= float(value) <= 1.0 if closed_right else 0.0 <= float(value) < 1.0
    _check(ok, key, value, f"must be in [0, 1{']' if closed_right else ')'}")


# --------------------------------------------------------------------------- dataset
DATASETS = ("iris", "digits", "mnist", "fashion_mnist", "cifar100")
TABULAR = ("iris", "digits")


@dataclass
class DatasetConfig:
    """``dataset`` group. ``root`` defaults to ``$SPARSEBENCH_DATA`` (else ``./data``)."""

    name: str = "digits"
    root: str = "./data"
    val_fraction: float = 0.1  # of the training split, seeded
    test_fraction: float = 0.2  # tabular only: held-out test share, seeded
    standardize: bool = True  # tabular: z-score with train statistics; images: mean/std normalise
    train_subset: Optional[int] = None  # keep the first N shuffled training samples (reduced scale)
    test_subset: Optional[int] = None
    pad_to: Optional[int] = None  # images: zero-pad to this side length (e.g. 32 for MNIST on a WRN)
    download: bool = False  # let torchvision download when a network is reachable
    verify_md5: bool = True  # check published md5 sums of the raw files where known
    split_seed: Optional[int] = None  # seed of the tabular split; None = the run's seed

    def __post_init__(self):
        _check(self.name in DATASETS, "dataset.name", self.name, f"unknown (allowed: {', '.join(DATASETS)})")
        check_fraction("dataset.val_fraction", self.val_fraction)
        _check(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", self.test_fraction, "must be in (0, 1)")
        for k in ("train_subset", "test_subset", "pad_to"):
            v = getattr(self, k)
            _check(v is None or v > 0, f"dataset.{k}", v, "must be a positive integer or null")


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """``model`` group. ``arch`` selects the network family: ``mlp`` or ``wrn``."""

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
        _check(self.arch in ("mlp", "wrn"), "model.arch", self.arch, "unknown (allowed: mlp, wrn)")
        _check(self.activation in ("relu", "tanh", "sigmoid", "gelu", "bipolar_sigmoid"), "model.activation",
               self.activation, "unknown (allowed: relu, tanh, sigmoid, gelu, bipolar_sigmoid)")
        _check(all(int(h) > 0 for h in self.hidden), "model.hidden", list(self.hidden), "widths must be positive")
        if self.arch == "wrn":
            _check(self.depth >= 10 and (self.depth - 4) % 6 == 0, "model.depth", self.depth,
                   "WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...)")
            _check(self.width >= 1, "model.width", self.width, "must be >= 1")
        check_fraction("model.dropout", self.dropout)


# --------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    """``trainer`` group: optimisation and device. ``iterations`` (if set) overrides ``epochs``."""

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
    eval_batch_size: int = 1000
    num_threads: Optional[int] = None  # torch.set_num_threads on CPU
    nan_check: bool = True  # stop with TrainingError on a non-finite loss
    # speed switches (issue 6); each must keep results within numerical tolerance
    amp: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no codegen, for quick checks)
    cudnn_benchmark: bool = False
    data_on_device: bool = True  # keep the tensors of small datasets on the training device
    progress: bool = False  # tqdm progress bar

    def __post_init__(self):
        _check(self.optimizer in ("sgd", "adam"), "trainer.optimizer", self.optimizer, "unknown (allowed: sgd, adam)")
        _check(self.lr > 0, "trainer.lr", self.lr, "must be > 0")
        _check(self.momentum >= 0, "trainer.momentum", self.momentum, "must be >= 0")
        _check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.schedule in ("constant", "cosine", "step"), "trainer.schedule", self.schedule,
               "unknown (allowed: constant, cosine, step)")
        _check(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        _check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        _check(self.iterations is None or self.iterations >= 1, "trainer.iterations", self.iterations, "must be >= 1")
        _check(self.loss in ("cross_entropy", "mse"), "trainer.loss", self.loss, "unknown (allowed: cross_entropy, mse)")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "trainer.device",
               self.device, "unknown (allowed: auto, cpu, cuda, cuda:N)")


# --------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """``logger`` group: ``csv`` (always written) plus optional Weights & Biases."""

    name: str = "csv"
    wandb: bool = False
    project: str = "sparsebench"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        _check(self.mode in ("auto", "online", "offline", "disabled"), "logger.mode", self.mode,
               "unknown (allowed: auto, online, offline, disabled)")


# --------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """Base of every ``method`` schema. Subclasses add their own keys."""

    name: str = "dense"


# --------------------------------------------------------------------------- top level
@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs"
    experiment: Optional[str] = None  # table ID this run belongs to (e.g. T003-imp)
    results_csv: Optional[str] = None  # also write the summary table here (atomically)
    resume: bool = True  # rerun of a finished run reports the stored result; interrupted runs resume


GROUP_SCHEMAS = {"dataset": DatasetConfig, "model": ModelConfig, "trainer": TrainerConfig, "logger": LoggerConfig}

# keys that never change a run's result and are left out of its hash
HASH_EXCLUDE = ("logger", "out_dir", "results_csv", "resume", "experiment", "dataset.root", "dataset.download",
                "trainer.device", "trainer.num_threads", "trainer.progress", "trainer.checkpoint_every")


# Keys added after the first release, with the value that makes them a no-op. A key at its no-op value
# is left out of the run hash, so adding a key never changes the identity of existing runs.
# Every new schema key MUST be listed here (tests/test_runs.py pins the hash of a fixed config).
NOOP_DEFAULTS: dict = {"trainer.compile_backend": "inductor"}


def _format_omegaconf_error(group: str, err: OmegaConfBaseException, allowed: List[str]) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    key = f"{group}.{key}" if not str(key).startswith(group) else str(key)
    msg = str(err).splitlines()[0]
    if "not in" in msg or "ConfigKeyError" in type(err).__name__:
        return f"{key}: unknown key (allowed: {', '.join(allowed)})"
    return f"{key}: {msg}"


def validate_group(group: str, node: Any, schema: type) -> Any:
    """Merge ``node`` onto ``schema`` and instantiate it; returns the dataclass instance.

    Raises:
        ConfigError: unknown key, wrong type or failing range check, naming ``group.key``.
    """
    allowed = [f.name for f in dataclasses.fields(schema)]
    if not isinstance(node, (DictConfig, dict)):
        raise ConfigError(f"{group}: expected a mapping, got {node!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(_format_omegaconf_error(group, err, allowed)) from None


def validate(cfg: DictConfig) -> DictConfig:
    """Validate every group of a composed config; returns it with defaults filled in.

    Raises:
        ConfigError: the first invalid key, with a one-line message naming it.
    """
    from sparsebench.methods import METHODS  # registered method schemas

    out = {}
    top_allowed = {f.name for f in dataclasses.fields(RunConfig)} | set(GROUP_SCHEMAS) | {"method", "hydra"}
    for key in cfg.keys():
        if key not in top_allowed:
            raise ConfigError(f"{key}: unknown key (allowed: {', '.join(sorted(top_allowed - {'hydra'}))})")
    for group, schema in GROUP_SCHEMAS.items():
        if group not in cfg:
            raise ConfigError(f"{group}: missing config group")
        out[group] = validate_group(group, cfg[group], schema)
    if "method" not in cfg or "name" not in cfg.method:
        raise ConfigError("method.name: missing (choose a method group, e.g. method=lth_imp)")
    schema = METHODS.schema(str(cfg.method.name)) or MethodConfig
    out["method"] = validate_group("method", cfg.method, schema)
    top = {k: cfg[k] for k in cfg.keys() if k not in GROUP_SCHEMAS and k not in ("method", "hydra")}
    run = validate_group("run", top, RunConfig)
    resolved = OmegaConf.create({**dataclasses.asdict(run), **{k: OmegaConf.structured(v) for k, v in out.items()}})
    _check_combination(out)
    OmegaConf.set_struct(resolved, True)
    return resolved


def _check_combination(groups: dict) -> None:
    ds, model = groups["dataset"], groups["model"]
    if model.arch == "wrn" and ds.name in TABULAR:
        raise ConfigError(f"model={model.name}: a WideResNet needs image data; dataset={ds.name} is tabular "
                          f"(use model=mlp, lenet300_100 or fc5)")


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore so YAML group files can extend it.

    Each group file starts with ``defaults: [_schema, _self_]`` (methods: ``[_schema_<name>, _self_]``),
    which makes every schema key overridable from the command line without ``+`` and lets Hydra reject
    unknown keys and wrong types at composition time.
    """
    from hydra.core.config_store import ConfigStore

    from sparsebench.methods import METHODS

    cs = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="_schema", node=schema)
    for name in METHODS.names():
        cs.store(group="method", name=f"_schema_{name}", node=METHODS.schema(name) or MethodConfig)
