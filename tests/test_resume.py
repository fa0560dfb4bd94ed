"""Kill a CPU run with SIGKILL mid-training, rerun it, and get exactly the uninterrupted result."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

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


@pytest.mark.parametrize("prefix", ["round2/", ""])
def test_rows_flushed_before_a_phases_first_checkpoint_are_not_logged_twice(tmp_path, prefix):
    """The window of the SIGKILL test above that a loaded machine hits: a phase logs its first epoch's
    evaluation, the checkpoint save flushes the metrics CSV, and the process dies before the checkpoint
    file exists. The rerun finds the phase's rows on disk but no checkpoint: it must drop them and start
    the phase over, ending with exactly the rows of an uninterrupted run."""
    from sparsebench.config import TrainerConfig
    from sparsebench.core.io import MetricsLog
    from sparsebench.data import DataBundle, Split
    from sparsebench.models import MLP
    from sparsebench.training.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    data = DataBundle("toy", "tabular", Split(x, y), Split(x[:32], y[:32]), Split(x[32:], y[32:]), 3)
    cfg = TrainerConfig(epochs=2, batch_size=16, device="cpu", checkpoint_every=1)

    def run(d, metrics):
        torch.manual_seed(0)
        tr = Trainer(cfg, MLP(6, 3, hidden=[8]), data, torch.device("cpu"), metrics=metrics, prefix=prefix,
                     checkpoint=str(d / "phase.pt"), seed=0)
        tr.fit()
        metrics.flush()
        return pd.read_csv(metrics.path)

    ref = run(tmp_path, MetricsLog(tmp_path / "ref.csv"))
    first_epoch = ref[ref.step == ref.step.min()]
    assert len(first_epoch) >= 5 and (prefix == "" or first_epoch.name.str.startswith(prefix).all())
    killed = tmp_path / "killed"
    killed.mkdir()
    first_epoch.to_csv(killed / "metrics.csv", index=False)  # flushed, and no checkpoint file
    again = run(killed, MetricsLog(killed / "metrics.csv", resume=True))
    pd.testing.assert_frame_equal(ref, again)
