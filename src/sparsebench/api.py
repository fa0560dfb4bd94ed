"""Programmatic entry points: compose a config like ``run.py`` does, and execute a run.

``execute(cfg)`` validates, creates the run directory named by the config hash, and either reports
the stored result of a finished run (``resume=true``) or runs the method, writing ``metrics.csv``,
``summary.csv`` and ``summary.json`` atomically. W&B logging (``logger=wandb``) uses the config hash
as run id with ``resume="allow"``; ``wandb.finish()`` always runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from hydra.errors import HydraException

from sparsebench.config import validate
from sparsebench.core.distributed import is_main
from sparsebench.core.errors import ConfigError
from sparsebench.core.io import MetricsLog, atomic_write_csv, atomic_write_json
from sparsebench.core.rundir import config_hash, prepare_run_dir

CONF_DIR = Path(os.environ.get("SPARSEBENCH_CONF", Path(__file__).resolve().parents[2] / "conf"))
GROUPS = ("dataset", "model", "method", "trainer", "logger")


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides (``["method=rigl", "seed=1"]``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sparsebench.config import register_schemas

    register_schemas()
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
    import re

    m = re.match(r"Could not override '([^']+)'", msg)
    if m or (cause is not None and "not in struct" in str(cause)):
        key = m.group(1) if m else key
        msg = f"{key}: unknown key (it is not in the group's schema; see conf/ and sparsebench/config.py)"
    elif cause is not None and getattr(cause, "msg", None) and "Value" in str(cause.msg):
        msg = f"{key}: {str(cause.msg).splitlines()[0]}"
    return msg


def _wandb_sink(cfg: DictConfig, run_id: str, run_dir: Path):
    if not cfg.logger.wandb or cfg.logger.mode == "disabled" or not is_main():
        return None, None
    import wandb

    mode = cfg.logger.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, id=run_id, resume="allow", mode=mode,
                     dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True), tags=list(cfg.logger.tags),
                     reinit="finish_previous")
    return run, (lambda step, metrics: run.log(dict(metrics), step=int(step)))


SUMMARY_COLUMNS = ["round", "stage", "density", "val_acc", "test_acc", "test_loss", "train_seconds"]


def format_summary(df: pd.DataFrame) -> str:
    cols = [c for c in SUMMARY_COLUMNS if c in df.columns] or list(df.columns)
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def execute(cfg: DictConfig, quiet: bool = False) -> pd.DataFrame:
    """Validate ``cfg`` and run it (or report its stored result). Returns the summary table.

    Raises:
        ConfigError / DataError / TrainingError: one-line user errors (see :mod:`sparsebench.core.errors`).
    """
    from sparsebench.methods import METHODS
    from sparsebench.methods.base import RunContext
    from sparsebench.training.trainer import resolve_device

    cfg = validate(cfg)
    run_id = config_hash(cfg)
    run_dir = prepare_run_dir(cfg)
    summary_path = run_dir / "summary.csv"
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if cfg.resume and summary_path.is_file():
        df = pd.read_csv(summary_path)
        say(f"run {run_id} already finished: {summary_path}")
    else:
        device = resolve_device(cfg.trainer.device)
        if cfg.trainer.num_threads:
            torch.set_num_threads(int(cfg.trainer.num_threads))
        say(f"run {run_id}: {'resuming ' if any((run_dir / 'checkpoints').glob('*.pt')) and cfg.resume else ''}method={cfg.method.name} dataset={cfg.dataset.name} model={cfg.model.name} "
            f"device={device} -> {run_dir}")
        # an interrupted run resumes: keep its metrics only when checkpoints exist to continue from
        resuming = cfg.resume and any((run_dir / "checkpoints").glob("*.pt"))
        if not resuming and is_main():
            for stale in (run_dir / "checkpoints").glob("*.pt"):
                stale.unlink()
        metrics = MetricsLog(run_dir / "metrics.csv", resume=resuming)
        wb_run, sink = _wandb_sink(cfg, run_id, run_dir)
        if sink:
            metrics.sinks.append(sink)
        try:
            method = METHODS.get(cfg.method.name)(RunContext(cfg, run_dir, device, metrics))
            df = method.run()
            df.insert(0, "run_id", run_id)
            if cfg.experiment:
                df.insert(0, "experiment", cfg.experiment)
            if is_main():
                atomic_write_csv(summary_path, df)
                atomic_write_json(run_dir / "summary.json", df.to_dict(orient="records"))
        finally:
            if metrics.rows and is_main():
                metrics.flush()
            if wb_run is not None:
                import wandb

                wandb.finish()
    if cfg.results_csv and is_main():
        atomic_write_csv(cfg.results_csv, df)
    say(format_summary(df))
    return df
