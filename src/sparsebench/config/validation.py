"""Validate a composed config against the schemas, and store the schemas in Hydra's ConfigStore.

:func:`validate` merges each group onto its dataclass schema (unknown key or wrong type ->
:class:`ConfigError`) and instantiates it, so the ``__post_init__`` range checks run; then it looks
every strategy name up in the registries it is given and runs the cross-group checks. Registries and
method schemas are passed in (see :func:`sparsebench.api.validate`), so this module imports no
strategy and there is no import cycle between config and the methods that import it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, List, Mapping, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsebench.config.schemas import GROUP_SCHEMAS, MethodConfig, RunConfig
from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry

MethodSchemas = Union[Registry, Mapping[str, type]]  # method.name -> schema (a Registry or a dict)


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


def method_schema(method_schemas: MethodSchemas, name: str) -> type:
    """The schema registered for ``method.name=name`` (:class:`MethodConfig` if none).

    Raises:
        ConfigError: ``name`` is not a registered method.
    """
    if isinstance(method_schemas, Registry):
        return method_schemas.schema(name) or MethodConfig
    if name not in method_schemas:
        raise ConfigError(f"method.name={name!r}: unknown (allowed: {', '.join(sorted(method_schemas))})")
    return method_schemas[name] or MethodConfig


def validate(cfg: DictConfig, method_schemas: MethodSchemas, registries: Iterable[Registry] = (),
             checks: Iterable[Callable[[dict], None]] = ()) -> DictConfig:
    """Validate every group of a composed config; returns it typed, with defaults filled in, read-only keys.

    Args:
        cfg: the composed config (``sparsebench.api.compose``).
        method_schemas: ``method.name`` -> schema, e.g. the ``METHODS`` registry.
        registries: registries whose ``kind`` is the dotted key they serve (``"model.arch"``); the
            value of that key must name an entry.
        checks: cross-group checks ``check({group: dataclass instance})`` run last.

    Raises:
        ConfigError: the first invalid key, with a one-line message naming it.
    """
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
    out["method"] = validate_group("method", cfg.method, method_schema(method_schemas, str(cfg.method.name)))
    top = {k: cfg[k] for k in cfg.keys() if k not in GROUP_SCHEMAS and k not in ("method", "hydra")}
    run = validate_group("run", top, RunConfig)
    for registry in registries:
        group, _, key = registry.kind.partition(".")
        registry.get(getattr(out[group], key))
    for check in checks:
        check(out)
    resolved = OmegaConf.create({**dataclasses.asdict(run), **{k: OmegaConf.structured(v) for k, v in out.items()}})
    OmegaConf.set_struct(resolved, True)
    return resolved


def register_schemas(method_schemas: MethodSchemas) -> None:
    """Store every schema in Hydra's ConfigStore so YAML group files can extend it.

    Each group file starts with ``defaults: [_schema, _self_]`` (methods: ``[_schema_<name>, _self_]``),
    which makes every schema key overridable from the command line without ``+`` and lets Hydra reject
    unknown keys and wrong types at composition time. The YAML files then hold only what differs
    from the schema.
    """
    from hydra.core.config_store import ConfigStore

    names = method_schemas.names() if isinstance(method_schemas, Registry) else sorted(method_schemas)
    cs = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="_schema", node=schema)
    for name in names:
        cs.store(group="method", name=f"_schema_{name}", node=method_schema(method_schemas, name))
