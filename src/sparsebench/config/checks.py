"""Range checks used by every schema's ``__post_init__``; each raises a one-line :class:`ConfigError`
that starts with the dotted key (``method.density=1.5: density must be in (0, 1]``)."""
from __future__ import annotations

from typing import Any

from sparsebench.core.errors import ConfigError


def check(cond: bool, key: str, value: Any, why: str) -> None:
    """Raise ``ConfigError(f"{key}={value!r}: {why}")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def check_density(key: str, value: float) -> None:
    """Raise :class:`ConfigError` unless ``0 < value <= 1``."""
    check(0.0 < float(value) <= 1.0, key, value, "density must be in (0, 1]")


def check_fraction(key: str, value: float, closed_right: bool = False) -> None:
    """Raise unless ``0 <= value < 1`` (or ``<= 1`` when ``closed_right``)."""
    ok = 0.0 <= float(value) <= 1.0 if closed_right else 0.0 <= float(value) < 1.0
    check(ok, key, value, f"must be in [0, 1{']' if closed_right else ')'}")
