"""``run.py``: the Hydra entry point. User errors print one line and exit with code 2.

Single runs are composed, validated and start-up checked (device, ``out_dir``) before Hydra starts,
so bad input fails in one ``error:`` line. In a sweep (``--multirun``) a failing cell prints its line,
leaves ``<sweep dir>/<job>/FAILED`` and the sweep goes on; when the sweep ends, :class:`SweepReport`
(a Hydra callback, ``hydra.callbacks`` in ``conf/config.yaml``) lists the failed cells and ``run.py``
exits non-zero (2 when every failure is a user error, else 1). A run stopped by SIGTERM / SIGUSR1
exits with submitit's requeue code 144 after writing its checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sparsebench.api import (CONF_DIR, GROUPS, check_startup, compose, execute, group_options, register_resolvers,
                             register_schemas, validate)
from sparsebench.core.errors import SparsebenchError

_FAILED: List[dict] = []  # failed sweep cells, filled by SweepReport at the end of a multirun


def _debug() -> bool:
    return bool(os.environ.get("HYDRA_FULL_ERROR") or os.environ.get("SPARSEBENCH_DEBUG"))


def _say_error(err: SparsebenchError) -> None:
    print(f"{getattr(err, 'prefix', 'error')}: {err}", file=sys.stderr, flush=True)


def check_group_overrides(argv) -> None:
    """Fail early, in one line, on ``group=value`` overrides naming no file in ``conf/<group>/``."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in GROUPS or "," in value or value.startswith(("choice(", "range(", "glob(")) or not value:
            continue
        if value not in group_options(group):
            allowed = group_options(group)
            raise SparsebenchError(f"{group}={value}: unknown option (allowed: {', '.join(allowed)})")


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, collect the ``FAILED`` files its cells left."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        found = []
        for path in sorted(Path(config.hydra.sweep.dir).glob("*/FAILED"), key=lambda p: p.parent.name):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                found.append({"job": path.parent.name, "overrides": [], "error": f"unreadable {path}",
                              "exit_code": 1})
        _FAILED[:] = found


def _record_failure(err: BaseException) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    code = err.exit_code if isinstance(err, SparsebenchError) else 1
    line = (str(err) if isinstance(err, SparsebenchError) else f"{type(err).__name__}: {err}").splitlines()
    info = {"job": hc.job.num, "overrides": list(hc.overrides.task), "error": line[0] if line else type(err).__name__,
            "exit_code": code}
    print(f"error: sweep cell {hc.job.num} ({' '.join(info['overrides'])}): {info['error']}", file=sys.stderr,
          flush=True)
    out = Path(hc.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "FAILED").write_text(json.dumps(info) + "\n")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sparsebench.training.runtime import Preempted

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        execute(cfg)
    except Preempted as err:  # stop the whole sweep: the job is being requeued
        _say_error(err)
        sys.exit(err.exit_code)
    except SparsebenchError as err:
        if _debug():
            raise
        if multirun:
            return _record_failure(err)  # one failing cell must not stop the sweep
        _say_error(err)
        sys.exit(err.exit_code)
    except Exception as err:
        if not multirun or _debug():
            raise
        return _record_failure(err)


def _preflight(argv) -> None:
    """Compose, validate and start-up check a single run before Hydra starts (one-line failures)."""
    check_group_overrides(argv)
    if any(a.startswith("-") for a in argv):  # --multirun, --help, --cfg ...: leave to Hydra
        return
    check_startup(validate(compose(argv)))


def main() -> None:
    """``run.py``: register the schemas and resolvers, fail fast on bad input, then hand over to Hydra;
    after a sweep, list its failed cells and exit non-zero."""
    register_schemas()
    register_resolvers()
    try:
        _preflight(sys.argv[1:])
    except SparsebenchError as err:
        if _debug():
            raise
        _say_error(err)
        sys.exit(err.exit_code)
    _hydra_main()
    if _FAILED:
        print(f"error: {len(_FAILED)} sweep cell(s) failed:", file=sys.stderr)
        for f in _FAILED:
            print(f"  job {f['job']}: {' '.join(f['overrides'])}: {f['error']}", file=sys.stderr)
        sys.exit(2 if all(f["exit_code"] == 2 for f in _FAILED) else 1)
