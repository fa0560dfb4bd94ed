"""Multirun sweeps: a failing job does not lose the others; the submitit launcher path works locally
(a table's failed cells are listed instead of crashing: tests/test_tables.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _summaries(out: Path):
    return sorted(out.glob("*/summary.csv"))


def test_multirun_with_a_failing_job_keeps_the_others(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "--multirun", f"out_dir={tmp_path}", "method=magnitude",
                        "method.density=0.5,7,0.2", "trainer.epochs=1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr  # issue 12: a sweep with failed cells exits non-zero, listing them
    assert "method.density=7.0: density must be in (0, 1]" in p.stderr
    assert "error: 1 sweep cell(s) failed" in p.stderr
    assert len(_summaries(tmp_path)) == 2


def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "--multirun", "hydra/launcher=local",
                        f"out_dir={tmp_path}", "method=dense", "trainer.epochs=1", "seed=0,1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(_summaries(tmp_path)) == 2


def test_wandb_offline_run_id_is_the_config_hash(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    from sparsebench.api import compose, execute

    df = execute(compose([f"out_dir={tmp_path}", "method=dense", "trainer.epochs=1", "logger=wandb",
                          "logger.mode=offline"]), quiet=True)
    run_id = df["run_id"][0]
    offline = list((tmp_path / run_id / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((tmp_path / run_id).rglob("*"))[:20]
