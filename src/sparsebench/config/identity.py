"""Run identity: the hash of what makes a run's result, i.e. the values that differ from the schema defaults.

As open_lth's ``Hparams.__str__`` / ``desc.hashname``: a key at its schema default is left out of the
hash, so adding a key (with a default that keeps the old behaviour) never changes existing run ids,
and the YAML files need not restate defaults. ``method.name`` is always hashed (it selects the method
schema whose defaults the other method keys are compared with). :data:`HASH_EXCLUDE` keys never
change a result (logging, paths, device) and are left out whatever their value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from sparsebench.config.schemas import RunConfig

# keys that never change a run's result and are left out of its hash
HASH_EXCLUDE = ("logger", "out_dir", "results_csv", "resume", "table", "dataset.root", "dataset.download",
                "trainer.device", "trainer.num_threads", "trainer.progress", "trainer.checkpoint_every",
                "trainer.checkpoint_every_steps", "lock_timeout")
# keys hashed even at their default: they select the schema the other keys are compared with
HASH_ALWAYS = ("method.name",)


def _defaults(schema: type) -> Dict[str, Any]:
    """``{field: default}`` of a dataclass schema; fields without a default are absent (always hashed)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return OmegaConf.to_container(OmegaConf.create(out))


def _drop(d: Dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if rest:
        if isinstance(d[head], dict):
            _drop(d[head], rest)
    else:
        del d[head]


def hashable_config(cfg: DictConfig) -> Dict[str, Any]:
    """The validated config as a plain dict of its non-default, result-relevant values.

    Args:
        cfg: a config returned by :func:`sparsebench.api.validate` (its group nodes carry their schema type).

    Raises:
        TypeError: ``cfg`` is not validated (a group node has no dataclass schema).
    """
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    keep = {k: _get(d, k) for k in HASH_ALWAYS}
    for key, value in list(d.items()):
        if isinstance(value, dict):
            schema = OmegaConf.get_type(cfg, key)
            if not dataclasses.is_dataclass(schema):
                raise TypeError(f"config_hash needs the validated config (sparsebench.api.validate); "
                                f"'{key}' has no schema")
            d[key] = _diff(value, _defaults(schema))
    d = _diff(d, _defaults(RunConfig))
    for key in HASH_EXCLUDE:
        _drop(d, key)
    for key, value in keep.items():
        head, _, leaf = key.partition(".")
        d.setdefault(head, {})[leaf] = value
    return {k: v for k, v in d.items() if v != {}}


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def _diff(values: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def config_hash(cfg: DictConfig, length: int = 12) -> str:
    """Stable hex digest (SHA-256 of sorted-key JSON) of :func:`hashable_config` (seed included)."""
    blob = json.dumps(hashable_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
