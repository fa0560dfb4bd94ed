"""Stop signals, step checkpoints, corrupt checkpoints and wall-clock accounting (issue 12).

SIGTERM (SLURM before preemption) stops training at the next step boundary with a checkpoint and
exit code 144 (submitit's requeue code); the rerun must equal an uninterrupted run exactly.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sparsebench.api import compose, execute
from sparsebench.training import runtime
from sparsebench.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BASE = ["method=dense", "dataset=digits", "trainer.epochs=3", "trainer.progress=false"]


def _metrics(out):
    (run,) = [p for p in Path(out).iterdir() if (p / "summary.csv").is_file()]
    return pd.read_csv(run / "metrics.csv"), pd.read_csv(run / "summary.csv"), run


def _kill_at(monkeypatch, step):
    """Send SIGTERM to this process during training step ``step`` (mid-epoch: 23 steps per epoch)."""
    orig = Trainer.train_step

    def train_step(self, x, y):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_requeue_code_is_submitits():
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    assert runtime.REQUEUE_EXIT_CODE == LOCAL_REQUEUE_RETURN_CODE == runtime.Preempted("x").exit_code


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    execute(compose([f"out_dir={out}", *BASE]), quiet=True)
    return _metrics(out)


def test_sigterm_mid_epoch_then_rerun_equals_uninterrupted(tmp_path, monkeypatch, reference):
    _kill_at(monkeypatch, 30)  # epoch 2, batch 8 of 23
    cfg = compose([f"out_dir={tmp_path}", *BASE])
    with pytest.raises(runtime.Preempted, match=r"^SIGTERM at step 31 .*checkpoint .*train.pt written"):
        execute(cfg, quiet=True)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    monkeypatch.undo()
    execute(compose([f"out_dir={tmp_path}", *BASE]), quiet=True)
    m, s, _ = _metrics(tmp_path)
    ref_m, ref_s, _ = reference
    pd.testing.assert_frame_equal(m, ref_m)
    cols = [c for c in ref_s.columns if c not in ("train_seconds",)]
    pd.testing.assert_frame_equal(s[cols], ref_s[cols])


def test_truncated_newest_checkpoint_resumes_from_previous(tmp_path, monkeypatch, reference, capfd):
    _kill_at(monkeypatch, 50)  # epoch 3: train.pt (step 51) + train.prev.pt (end of epoch 2)
    with pytest.raises(runtime.Preempted):
        execute(compose([f"out_dir={tmp_path}", *BASE]), quiet=True)
    monkeypatch.undo()
    (run,) = list(tmp_path.iterdir())
    newest = run / "checkpoints" / "train.pt"
    assert (run / "checkpoints" / "train.prev.pt").is_file()
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    capfd.readouterr()
    execute(compose([f"out_dir={tmp_path}", *BASE]), quiet=True)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(newest) in err[0] and "train.prev.pt" in err[0], err
    m, s, _ = _metrics(tmp_path)
    pd.testing.assert_frame_equal(m, reference[0])


def test_step_checkpoints_and_wall_clock_accumulate(tmp_path, monkeypatch, reference):
    import torch

    _kill_at(monkeypatch, 40)
    args = [f"out_dir={tmp_path}", *BASE, "trainer.checkpoint_every_steps=10"]
    with pytest.raises(runtime.Preempted):
        execute(compose(args), quiet=True)
    monkeypatch.undo()
    (run,) = list(tmp_path.iterdir())
    first = torch.load(run / "checkpoints" / "train.pt", weights_only=False)
    assert first["step"] == 41 and first["epoch_pos"] is not None and first["time_training"] > 0
    prev = torch.load(run / "checkpoints" / "train.prev.pt", weights_only=False)
    assert prev["step"] == 40  # the step-based checkpoint
    execute(compose(args), quiet=True)  # checkpoint_every_steps is not part of the run hash
    m, s, _ = _metrics(tmp_path)
    pd.testing.assert_frame_equal(m, reference[0])
    assert s["train_seconds"].iloc[0] >= first["time_training"]  # earlier process counted too


def test_cli_sigterm_exits_with_requeue_code_and_one_line(tmp_path):
    env = {**os.environ, "SPARSEBENCH_OUT": str(tmp_path)}
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "method=dense", "trainer.iterations=100000",
                          "trainer.progress=false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    line = p.stdout.readline()  # "run <id>: method=dense ..." is printed before training starts
    assert line.startswith("run "), line
    import time

    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 144, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: SIGTERM at step"), lines
