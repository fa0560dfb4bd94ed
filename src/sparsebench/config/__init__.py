"""Configuration: structured schemas (:mod:`.schemas`), range checks (:mod:`.checks`), validation against
schemas and registries (:mod:`.validation`) and run identity (:mod:`.identity`).

A leaf layer: it imports nothing of sparsebench but :mod:`sparsebench.core`. Method schemas subclass
:class:`MethodConfig` and use the checks, ``from sparsebench.config import MethodConfig, check, check_density``.
The validation entry point that knows the registries is :func:`sparsebench.api.validate`.
"""
from sparsebench.config.checks import check, check_density, check_fraction
from sparsebench.config.schemas import (GROUP_SCHEMAS, DatasetConfig, LoggerConfig, MethodConfig, ModelConfig,
                                        RunConfig, TrainerConfig)

__all__ = ["check", "check_density", "check_fraction", "GROUP_SCHEMAS", "DatasetConfig", "LoggerConfig",
           "MethodConfig", "ModelConfig", "RunConfig", "TrainerConfig"]
