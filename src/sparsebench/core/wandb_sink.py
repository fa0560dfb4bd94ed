"""Weights & Biases logging (``logger=wandb``), by W&B's own conventions.

* Mode: ``WANDB_MODE`` (``online`` / ``offline`` / ``disabled``) wins when set; else ``logger.mode``;
  ``auto`` is online when credentials exist (``WANDB_API_KEY`` or the netrc entry ``wandb login``
  writes for ``WANDB_BASE_URL``'s host), else offline. ``disabled`` creates nothing.
* Files: ``$WANDB_DIR`` when set, else ``<run_dir>/wandb``; run id = the config hash, ``resume="allow"``,
  so a requeued run continues the same W&B run.
* An unreachable service costs at most ``logger.init_timeout`` seconds, then the run goes on offline
  with one warning line (upload later with ``wandb sync``).
* History: W&B's own step stays monotonic over the whole run (one ``log`` per metrics call, no
  ``step=``), so IMP rounds, whose trainer steps restart, keep every point; ``trainer/step``,
  ``round`` and ``epoch`` are logged as axes (``define_metric``; every metric is plotted against
  ``trainer/step``). Per-layer densities arrive as ``<prefix>density/<layer>`` (trainer, sinks only).
* End: the last summary row goes to ``run.summary`` (all rows as the table ``summary_table``),
  checkpoints optionally as an artifact (``logger.log_artifacts``), and ``finish(exit_code=...)``
  records failures with a non-zero code.
* A finished run: :func:`upload_finished` re-logs its stored ``metrics.csv`` and summary (when no W&B
  files of it exist yet), or names the ``wandb sync`` command for its offline files.
"""
from __future__ import annotations

import math
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import pandas as pd
from omegaconf import DictConfig, OmegaConf

_ROUND = re.compile(r"^round(\d+)/")


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def has_credentials() -> bool:
    """``WANDB_API_KEY`` is set, or the netrc file (``$NETRC`` or ``~/.netrc``, written by ``wandb login``)
    has an entry for the W&B host (``$WANDB_BASE_URL``, default ``https://api.wandb.ai``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(logger_cfg) -> str:
    """``online`` | ``offline`` | ``disabled`` from ``WANDB_MODE`` (wins; ``dryrun`` = offline), else
    ``logger.mode`` (``auto``: online with credentials, else offline)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return "offline" if env == "dryrun" else "online" if env == "run" else env
    mode = logger_cfg.mode
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return mode


class WandbSink:
    """One W&B run for one sparsebench run; ``sink(step, metrics)`` is a :class:`MetricsLog` sink."""

    def __init__(self, run):
        self.run = run

    def __call__(self, step: int, metrics: dict) -> None:
        row = {k: float(v) for k, v in metrics.items()}
        row["trainer/step"] = int(step)
        m = next((_ROUND.match(k) for k in metrics if _ROUND.match(k)), None)
        if m:
            row["round"] = int(m.group(1))
        for k in list(row):
            if k.endswith("/epoch") or k == "epoch":
                row["epoch"] = row.pop(k)
        self.run.log(row)

    def summary(self, df: pd.DataFrame) -> None:
        """The last summary row (numbers and strings) into ``run.summary``; all rows as ``summary_table``."""
        if df is None or df.empty:
            return
        last = {k: (v.item() if hasattr(v, "item") else v) for k, v in df.iloc[-1].items()}
        self.run.summary.update({k: v for k, v in last.items()
                                 if isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                 or isinstance(v, bool)})
        try:
            import wandb

            self.run.log({"summary_table": wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})
        except Exception as err:  # a table is a convenience; the summary above is what counts
            _warn(f"W&B summary table not logged ({type(err).__name__}: {err})")

    def artifact(self, run_id: str, run_dir: Path) -> None:
        import wandb

        ckpts = Path(run_dir) / "checkpoints"
        if ckpts.is_dir() and any(ckpts.iterdir()):
            art = wandb.Artifact(f"run-{run_id}", type="checkpoints", description="masks and training state")
            art.add_dir(str(ckpts))
            self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=int(exit_code))


def open_sink(cfg: DictConfig, run_id: str, run_dir: Path) -> Optional[WandbSink]:
    """Start the W&B run of ``cfg`` (None: ``logger.wandb`` off, mode disabled, or not rank 0)."""
    from sparsebench.core.distributed import is_main

    if not cfg.logger.wandb or not is_main():
        return None
    mode = resolve_mode(cfg.logger)
    if mode == "disabled":
        return None
    import wandb

    kwargs = dict(project=cfg.logger.project, entity=cfg.logger.entity, id=run_id, resume="allow",
                  config=OmegaConf.to_container(cfg, resolve=True), tags=list(cfg.logger.tags), group=cfg.table,
                  reinit="finish_previous", settings=wandb.Settings(init_timeout=float(cfg.logger.init_timeout)))
    if not os.environ.get("WANDB_DIR"):
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(run_dir)
    kwargs["mode"] = mode  # resolve_mode already follows WANDB_MODE
    try:
        run = wandb.init(**kwargs)
    except Exception as err:
        if mode != "online":
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        _warn(f"W&B service not reachable within logger.init_timeout={cfg.logger.init_timeout:g} s ({first}); "
              f"logging offline (upload later with `wandb sync`)")
        run = wandb.init(**{**kwargs, "mode": "offline"})
    run.define_metric("trainer/step")
    run.define_metric("round")
    run.define_metric("epoch")
    run.define_metric("*", step_metric="trainer/step")
    return WandbSink(run)


def local_runs(run_id: str, run_dir: Path) -> list:
    """W&B run directories of ``run_id`` under ``$WANDB_DIR`` or ``<run_dir>``."""
    base = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else Path(run_dir)
    return sorted((base / "wandb").glob(f"*run-*-{run_id}"))


def upload_finished(cfg: DictConfig, run_id: str, run_dir: Path, say: Callable[[str], None] = print) -> None:
    """``logger=wandb`` on a finished run: re-log its stored ``metrics.csv`` (in order, one ``log`` per
    step group) and summary to W&B when no W&B files of the run exist; else name the ``wandb sync``
    command for them. The run's own result files are only read."""
    existing = local_runs(run_id, run_dir)
    if existing:
        say(f"W&B files of run {run_id}: {existing[-1]} (upload with: wandb sync {existing[-1]})")
        return
    sink = open_sink(cfg, run_id, run_dir)
    if sink is None:
        return
    metrics = pd.read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else pd.DataFrame()
    group, step = {}, None
    for s, name, value in metrics.itertuples(index=False, name=None):
        if step is not None and s != step:
            sink(step, group)
            group = {}
        step = s
        if not (isinstance(value, float) and math.isnan(value)):
            group[name] = value
    if group:
        sink(step, group)
    sink.summary(pd.read_csv(run_dir / "summary.csv"))
    sink.finish(0)
    say(f"re-logged {len(metrics)} metric values of finished run {run_id} to W&B")
