"""Method registry. Importing this package registers every built-in method.

A method is a :class:`~sparsebench.methods.base.Method` subclass registered with
``@METHODS.register(name, schema=ConfigDataclass)``; ``method.name`` in the config selects it.
"""
from sparsebench.core.registry import Registry

METHODS: Registry = Registry("method.name")

from sparsebench.methods import base  # noqa: E402,F401
from sparsebench.methods import dense, pruning  # noqa: E402,F401

# optional method modules added by later issues register themselves here
import importlib as _importlib  # noqa: E402

for _mod in ("static", "dst", "lpa", "unit"):
    try:
        _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _err:  # module not written yet
        if _err.name != f"{__name__}.{_mod}":
            raise
