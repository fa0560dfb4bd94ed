"""Data-parallel training on CPU with the gloo backend and 2 processes (torchrun)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("mode", ["regrow", "faiss_grow"])
def test_ddp_gloo_two_processes_keep_masks_identical(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(HERE / "ddp_worker.py"), str(tmp_path), mode], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # masks and weights identical on both ranks
    masks = [v for k, v in r0["state"].items() if k.endswith("weight_mask")]
    assert masks and all(0 < float(m.mean()) < 1 for m in masks)
    for k in r0["state"]:
        if k.endswith(".weight"):
            mask = r0["state"][k + "_mask"] if k + "_mask" in r0["state"] else None
            if mask is not None:
                assert torch.all(r0["state"][k][mask == 0] == 0)
    assert r0["final"]["test_acc"] == r1["final"]["test_acc"] > 0.3
