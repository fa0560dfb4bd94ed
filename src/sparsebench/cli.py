"""``run.py``: the Hydra entry point. User errors print one line and exit with code 2."""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from sparsebench.api import CONF_DIR, GROUPS, compose, execute
from sparsebench.config import register_schemas, validate
from sparsebench.core.errors import SparsebenchError

register_schemas()


def _debug() -> bool:
    return bool(os.environ.get("HYDRA_FULL_ERROR") or os.environ.get("SPARSEBENCH_DEBUG"))


def check_group_overrides(argv) -> None:
    """Fail early, in one line, on ``group=value`` overrides naming no file in ``conf/<group>/``."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in GROUPS or "," in value or value.startswith(("choice(", "range(", "glob(")) or not value:
            continue
        if not (CONF_DIR / group / f"{value}.yaml").is_file():
            allowed = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise SparsebenchError(f"{group}={value}: unknown option (allowed: {', '.join(allowed)})")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        execute(cfg)
    except SparsebenchError as err:
        if _debug():
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # one failing job must not stop the sweep
        sys.exit(err.exit_code)


def _preflight(argv) -> None:
    """Compose and validate a single run before Hydra starts, so bad input fails in one line."""
    check_group_overrides(argv)
    if any(a.startswith("-") for a in argv):  # --multirun, --help, --cfg ...: leave to Hydra
        return
    validate(compose(argv))


def main() -> None:
    try:
        _preflight(sys.argv[1:])
    except SparsebenchError as err:
        if _debug():
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    _hydra_main()
