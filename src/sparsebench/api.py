"""Programmatic entry points: compose a config like ``run.py`` does, and execute a run.

``execute(cfg)`` validates, checks what can be checked at start-up (the device exists, ``out_dir`` is a
writable directory), takes the run directory's lock (:mod:`sparsebench.core.lock`: a second process on
the same config waits, then reports or resumes), and either reports the stored result of a finished
run (``resume=true``; its files are only read) or runs the method, writing ``metrics.csv``,
``summary.csv`` and ``summary.json`` atomically. SIGTERM / SIGUSR1 stop training at the next step
boundary with a checkpoint (:func:`sparsebench.training.runtime.stop_signals`). W&B logging
(``logger=wandb``) is :mod:`sparsebench.core.wandb_sink`; a failed run finishes its W&B run with a
non-zero exit code.
"""
from __future__ import annotations

import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from hydra.errors import HydraException

from sparsebench.config import validation
from sparsebench.config.identity import config_hash
from sparsebench.core.distributed import is_main
from sparsebench.core.errors import ConfigError
from sparsebench.core.io import MetricsLog, atomic_write_csv, atomic_write_json
from sparsebench.core.lock import run_lock
from sparsebench.core.rundir import prepare_run_dir
from sparsebench.core.threads import torch_threads


def find_conf_dir() -> Path:
    """The config directory: ``$SPARSEBENCH_CONF``, else ``sparsebench/conf`` shipped inside the package
    (package data, so a non-editable install runs).

    Raises:
        ConfigError: the directory has no ``config.yaml``.
    """
    path = Path(os.environ["SPARSEBENCH_CONF"]) if os.environ.get("SPARSEBENCH_CONF") else \
        Path(str(resources.files("sparsebench") / "conf"))
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path}: no config.yaml here (set SPARSEBENCH_CONF to a config directory)")
    return path


CONF_DIR = find_conf_dir()
GROUPS = ("dataset", "model", "method", "trainer", "logger")


def _registries():
    """The registries whose names config values select (each registry's ``kind`` is its dotted key)."""
    from sparsebench.data import DATASETS
    from sparsebench.data.augment import AUGMENTATIONS
    from sparsebench.models import ACTIVATIONS, ARCHS
    from sparsebench.training.optim import LOSSES, LR_SCHEDULES, OPTIMIZERS

    return (DATASETS, AUGMENTATIONS, ARCHS, ACTIVATIONS, OPTIMIZERS, LR_SCHEDULES, LOSSES)


def _check_model(groups: dict) -> None:
    from sparsebench.models import check_model, check_model_fits_dataset

    check_model(groups["model"])
    check_model_fits_dataset(groups["model"], groups["dataset"])


def _check_sparse_backend(groups: dict) -> None:
    """``trainer.sparse_backend`` names a registered kernels backend that can run here, or ``auto``."""
    from sparsebench.core.errors import ConfigError
    from sparsebench.sparsity.kernels import KERNELS, resolve_kernels

    name = str(groups["trainer"].sparse_backend)
    resolve_kernels(name)
    if name != "auto" and not KERNELS.meta(name)["available"]():
        raise ConfigError(f"trainer.sparse_backend={name}: cannot run here ({KERNELS.meta(name)['description']}); "
                          f"use auto")


def validate(cfg: DictConfig) -> DictConfig:
    """Validate a composed config against the schemas and the registries; returns it typed and complete.

    The entry point that knows the strategies: method schemas come from ``METHODS``, names such as
    ``model.arch`` and ``trainer.optimizer`` are looked up in their registries, and the architecture
    must fit the dataset kind (:func:`sparsebench.config.validation.validate` does the work).

    Raises:
        ConfigError: the first invalid key, with a one-line message naming it.
    """
    from sparsebench.methods import METHODS

    from sparsebench.data.augment import check_augment

    return validation.validate(cfg, method_schemas=METHODS, registries=_registries(),
                               checks=(_check_model, check_augment, _check_sparse_backend))


def register_schemas() -> None:
    """Store all group and method schemas in Hydra's ConfigStore (``defaults: [_schema, _self_]``)."""
    from sparsebench.methods import METHODS

    validation.register_schemas(METHODS)


def group_options(group: str) -> list:
    """The options of a config group: the YAML files in ``conf/<group>/`` (without the schemas)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _help_groups() -> str:
    return "\n".join(f"{g}: {', '.join(group_options(g))}" for g in GROUPS)


def register_resolvers() -> None:
    """``${sparsebench_groups:}`` (used by ``hydra.help`` in conf/config.yaml): the real options per group."""
    if not OmegaConf.has_resolver("sparsebench_groups"):
        OmegaConf.register_new_resolver("sparsebench_groups", _help_groups)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides (``["method=rigl", "seed=1"]``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except HydraException as err:
            raise ConfigError(hydra_error_line(err)) from None


def hydra_error_line(err: Exception) -> str:
    """Hydra's composition error as one line naming the key (its first line, plus the cause's key)."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    m = re.match(r"Could not override '([^']+)'", msg)
    if m or (cause is not None and "not in struct" in str(cause)):
        key = m.group(1) if m else key
        msg = f"{key}: unknown key (it is not in the group's schema; see conf/ and sparsebench/config/schemas.py)"
    elif cause is not None and getattr(cause, "msg", None) and "Value" in str(cause.msg):
        msg = f"{key}: {str(cause.msg).splitlines()[0]}"
    return msg


SUMMARY_COLUMNS = ["round", "stage", "density", "val_acc", "test_acc", "test_loss", "train_seconds"]


def format_summary(df: pd.DataFrame) -> str:
    cols = [c for c in SUMMARY_COLUMNS if c in df.columns] or list(df.columns)
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def check_out_dir(out_dir: str) -> Path:
    """``out_dir`` exists (or can be created) as a writable directory; returns it.

    Raises:
        ConfigError: it is a file, cannot be created, or is not writable.
    """
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"out_dir={out_dir!r}: is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out_dir={out_dir!r}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir={out_dir!r}: directory is not writable")
    return p


def check_startup(cfg: DictConfig):
    """The checks of a validated config that need the machine: ``trainer.device`` exists here and
    ``out_dir`` is writable. Returns the resolved device.

    Raises:
        ConfigError: one line naming the key.
    """
    from sparsebench.training.runtime import resolve_device

    device = resolve_device(cfg.trainer.device)
    check_out_dir(cfg.out_dir)
    return device


def execute(cfg: DictConfig, quiet: bool = False) -> pd.DataFrame:
    """Validate ``cfg`` and run it (or report its stored result). Returns the summary table.

    Raises:
        ConfigError / DataError / TrainingError: one-line user errors (see :mod:`sparsebench.core.errors`).
        RunLockedError: another process holds the run directory after ``lock_timeout`` seconds.
        Preempted: stopped by SIGTERM / SIGUSR1 after a checkpoint (exit code 144, submitit's requeue).
    """
    from contextlib import nullcontext

    cfg = validate(cfg)
    run_id = config_hash(cfg)
    check_startup(cfg)  # before a stored result is reported: trainer.device=cuda on a CPU machine fails
    run_dir = Path(cfg.out_dir) / run_id
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    with run_lock(run_dir, cfg.lock_timeout) if is_main() else nullcontext():
        summary_path = run_dir / "summary.csv"
        if cfg.resume and summary_path.is_file():
            df = pd.read_csv(summary_path)
            say(f"run {run_id} already finished: {summary_path}")
            if cfg.logger.wandb and is_main():
                from sparsebench.core.wandb_sink import upload_finished

                upload_finished(cfg, run_id, run_dir, say=say)
        else:
            from sparsebench.training.runtime import stop_requested, stop_signals

            prepare_run_dir(cfg, run_id)
            with stop_signals():  # held over the final evaluation and the result files: a late signal lets
                df = _train(cfg, run_id, run_dir, say)  # the run finish (README, "Running on a cluster")
                late = stop_requested()
            if late:
                print(f"warning: {late} arrived when no training step was left; the run finished and its "
                      f"result is written", file=sys.stderr, flush=True)
        if cfg.results_csv and is_main():
            atomic_write_csv(cfg.results_csv, df)
    say(format_summary(df))
    return df


def _train(cfg: DictConfig, run_id: str, run_dir: Path, say) -> pd.DataFrame:
    """Run the method of a validated ``cfg`` in ``run_dir`` (resuming from its checkpoints)."""
    from sparsebench.core.errors import SparsebenchError
    from sparsebench.core.wandb_sink import open_sink
    from sparsebench.methods import METHODS
    from sparsebench.methods.base import RunContext
    from sparsebench.training.runtime import setup_run, stop_signals

    summary_path = run_dir / "summary.csv"
    device = setup_run(cfg.trainer)  # once per run: device, torchrun process group, cuDNN flags
    # an interrupted run resumes: keep its metrics only when checkpoints exist to continue from
    resuming = cfg.resume and any((run_dir / "checkpoints").glob("*.pt"))
    say(f"run {run_id}: {'resuming ' if resuming else ''}method={cfg.method.name} dataset={cfg.dataset.name} "
        f"model={cfg.model.name} device={device} -> {run_dir}")
    if not resuming and is_main():
        for stale in (run_dir / "checkpoints").glob("*.pt"):
            stale.unlink()
    metrics = MetricsLog(run_dir / "metrics.csv", resume=resuming)
    sink = open_sink(cfg, run_id, run_dir)
    if sink is not None:
        metrics.sinks.append(sink)
    exit_code = 1
    try:
        with torch_threads(cfg.trainer.num_threads), stop_signals():  # both restored when the run ends
            method = METHODS.get(cfg.method.name)(RunContext(cfg, run_dir, device, metrics))
            df = method.run()
        df.insert(0, "run_id", run_id)
        if cfg.table:
            df.insert(0, "table", cfg.table)
        if is_main():
            atomic_write_csv(summary_path, df)
            atomic_write_json(run_dir / "summary.json", df.to_dict(orient="records"))
        if sink is not None:
            sink.summary(df)
            if cfg.logger.log_artifacts:
                sink.artifact(run_id, run_dir)
        exit_code = 0
    except SparsebenchError as err:
        exit_code = err.exit_code
        raise
    finally:
        if metrics.rows and is_main():
            metrics.flush()
        if sink is not None:
            sink.finish(exit_code)
    return df
