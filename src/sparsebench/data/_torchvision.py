"""Import torchvision robustly on a CPU-only torch build.

Known problem: the torchvision wheel on PyPI is built against the CUDA torch; with the CPU torch
(``torch==2.13.0+cpu``) its C++ extension ``torchvision._C`` fails to load, which torchvision
tolerates, but ``torchvision/_meta_registrations.py`` then calls
``torch.library.register_fake("torchvision::nms")`` on an operator that was never defined, and
``import torchvision`` dies with ``RuntimeError: operator torchvision::nms does not exist``.

sparsebench only needs ``torchvision.datasets`` and ``transforms`` (pure Python). The fix: when
the first import fails that way, define the *schemas* of the two operators torchvision registers
fake kernels for (``nms``, ``qnms``, with the signatures of torchvision's C++ ``TORCH_LIBRARY``
block), drop the half-imported modules and import again. The detection ops stay unusable (calling
them raises torch's "no kernel" error), everything else works. With a matching torchvision build
the first import succeeds and nothing is patched.
"""
from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # keeps the torch.library definitions alive for the whole process
PATCHED = False  # True when the schema shim was needed


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, applying the CPU-build shim described above if needed.

    Raises:
        ImportError: torchvision is not installed or fails for another reason.
    """
    global _LIBRARY, PATCHED
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise ImportError(f"import torchvision failed: {err}") from err
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    missing = {k: v for k, v in _SCHEMAS.items() if not _op_exists(k)}
    if missing:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing.values():
            _LIBRARY.define(schema)
    PATCHED = True
    import torchvision

    return torchvision
