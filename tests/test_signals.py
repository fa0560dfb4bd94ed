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


# ----------------------------------------------------------------- a signal after the last training step
def test_sigterm_after_the_last_step_finishes_the_run(tmp_path, monkeypatch, reference, capfd):
    """During the final evaluation and while the result files are written a SIGTERM is only noted: the
    run finishes (summary written, metrics of an uninterrupted run) with one warning line."""
    import sparsebench.api as api

    orig_eval, orig_json, seen = Trainer.evaluate_splits, api.atomic_write_json, []

    def evaluate_splits(self, splits=("val", "test")):
        if self.step == self.total_steps and not seen:
            seen.append("eval")
            os.kill(os.getpid(), signal.SIGTERM)
        return orig_eval(self, splits)

    def atomic_write_json(path, obj):  # the handler must still be ours while the summary is written
        seen.append(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)
        if seen[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig_json(path, obj)

    monkeypatch.setattr(Trainer, "evaluate_splits", evaluate_splits)
    monkeypatch.setattr(api, "atomic_write_json", atomic_write_json)
    capfd.readouterr()
    execute(compose([f"out_dir={tmp_path}", *BASE]), quiet=True)
    assert seen == ["eval", True]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: SIGTERM arrived when no training step was left"), err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and runtime.stop_requested() is None
    m, s, run = _metrics(tmp_path)
    pd.testing.assert_frame_equal(m, reference[0])
    assert (run / "summary.json").is_file()


# ----------------------------------------------------------------- a corrupt method state (IMP)
IMP = ["method=lth_imp", "method.rounds=2", "dataset=iris", "trainer.epochs=3", "trainer.progress=false"]


def test_corrupt_imp_state_falls_back_to_the_previous_one(tmp_path, monkeypatch, capfd):
    ref = tmp_path / "ref"
    execute(compose([f"out_dir={ref}", *IMP]), quiet=True)
    orig = Trainer.train_step

    def train_step(self, x, y):  # SIGTERM in round 2's second epoch (after its first evaluation)
        if self.prefix == "round2/" and self.step == self.steps_per_epoch + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "cut"
    with pytest.raises(runtime.Preempted):
        execute(compose([f"out_dir={out}", *IMP]), quiet=True)
    monkeypatch.undo()
    (run,) = list(out.iterdir())
    newest, prev = run / "checkpoints" / "lth_state.pt", run / "checkpoints" / "lth_state.prev.pt"
    assert prev.is_file()  # save_state keeps the previous version, like the trainer's checkpoints
    newest.write_bytes(newest.read_bytes()[:500])  # truncated
    capfd.readouterr()
    execute(compose([f"out_dir={out}", *IMP]), quiet=True)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(newest) in err[0] and "lth_state.prev.pt" in err[0], err
    m, s, _ = _metrics(out)
    ref_m, ref_s, _ = _metrics(ref)
    pd.testing.assert_frame_equal(m, ref_m)
    cols = [c for c in ref_s.columns if c not in ("train_seconds", "run_id")]
    pd.testing.assert_frame_equal(s[cols], ref_s[cols])
