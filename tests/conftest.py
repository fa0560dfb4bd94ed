import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
if "SPARSEBENCH_DATA" not in os.environ and (SHARED / "MNIST" / "raw").is_dir():
    os.environ["SPARSEBENCH_DATA"] = str(SHARED)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "sparsebench" / "numba"))


def real_mnist_root():
    root = os.environ.get("SPARSEBENCH_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        return root
    return None


@pytest.fixture
def mnist_root():
    root = real_mnist_root()
    if root is None:
        pytest.skip("real MNIST not present (set SPARSEBENCH_DATA)")
    return root


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("SPARSEBENCH_OUT", str(d))
    return d


@pytest.fixture
def compose_cfg(out_dir):
    """compose(overrides) with out_dir pointing at a temporary directory."""
    from sparsebench.api import compose

    def _compose(*overrides):
        return compose([f"out_dir={out_dir}", *overrides])

    return _compose
