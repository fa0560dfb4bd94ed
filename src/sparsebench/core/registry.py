"""A tiny name -> class registry used for methods, datasets, models, distributions, grow criteria, ...

Strategies register themselves with a decorator and are looked up by the config value, so the
training loop never branches on method names (the sparse_learning / open_lth idea of one
mechanism with pluggable parts).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Optional, TypeVar

from sparsebench.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a config name to a class (or function), optionally its config schema, and metadata.

    Metadata (``register(name, **meta)``) describes an entry without importing or building it, e.g. a
    dataset's ``kind`` or the input an architecture needs; read it with :meth:`meta`.

    Args:
        kind: the config key this registry serves, used in error messages (e.g. ``"method.name"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}
        self._schemas: Dict[str, Optional[type]] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str, schema: Optional[type] = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; ``schema`` is a dataclass validating its config,
        ``meta`` free-form metadata (see :meth:`meta`).

        Raises:
            KeyError: another object is already registered under ``name``.
        """

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind}: '{name}' registered twice")
            self._entries[name] = obj
            self._schemas[name] = schema
            self._meta[name] = dict(meta)
            return obj

        return deco

    def get(self, name: str) -> Any:
        """Return the entry for ``name``; raises :class:`ConfigError` listing the allowed names."""
        if name not in self._entries:
            raise ConfigError(f"{self.kind}={name!r}: unknown (allowed: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def schema(self, name: str) -> Optional[type]:
        self.get(name)
        return self._schemas[name]

    def meta(self, name: str) -> Dict[str, Any]:
        """The metadata given at registration (empty dict if none); raises ConfigError for unknown names."""
        self.get(name)
        return self._meta[name]

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
