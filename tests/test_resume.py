"""Kill a CPU run with SIGKILL mid-training, rerun it, and get exactly the uninterrupted result."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["method=lth_imp", "method.rounds=3", "trainer.epochs=4", "model.hidden=[256,128]", "trainer.batch_size=16",
        "trainer.device=cpu", "trainer.num_threads=1"]


def _run(out, extra=()):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), f"out_dir={out}", *ARGS, *extra],
                          capture_output=True, text=True, timeout=300)


def _compare(a: Path, b: Path):
    sa, sb = pd.read_csv(a / "summary.csv"), pd.read_csv(b / "summary.csv")
    cols = ["round", "density", "val_acc", "test_acc", "test_loss", "steps"]
    pd.testing.assert_frame_equal(sa[cols], sb[cols])
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    pd.testing.assert_frame_equal(ma, mb)


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    (run_id,) = [p.name for p in (tmp_path / "ref").iterdir() if p.is_dir() and p.name != "hydra"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"out_dir={out}", *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = out / run_id / "checkpoints" / "round1.pt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    time.sleep(0.3)  # somewhere inside the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / run_id / "summary.csv").exists()

    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    _compare(tmp_path / "ref" / run_id, out / run_id)

    again = _run(out)  # a finished run is a no-op that reports the stored result
    assert "already finished" in again.stdout
