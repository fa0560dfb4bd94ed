"""Run identity, determinism, run directory contents, stored-result reuse, the main job."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from sparsebench.api import compose, execute
from sparsebench.config import validate
from sparsebench.core.rundir import config_hash

ROOT = Path(__file__).resolve().parents[1]


def test_hash_of_fixed_config_never_changes():
    # if this fails, a change altered run identity: new config keys must default to a no-op
    cfg = validate(compose(["method=lth_imp", "dataset=digits", "model=mlp", "seed=0"]))
    assert config_hash(cfg) == FIXED_HASH


FIXED_HASH = "c818feee6a3f"


def test_hash_ignores_logging_paths_and_device_but_not_seed():
    a = validate(compose(["out_dir=/tmp/a", "trainer.device=cpu"]))
    b = validate(compose(["out_dir=/tmp/b", "trainer.device=auto", "logger=wandb", "experiment=T003-imp"]))
    c = validate(compose(["seed=1"]))
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_same_seed_gives_identical_metrics_on_cpu(tmp_path):
    ov = ["method.rounds=1", "trainer.epochs=2", "model.hidden=[32]", "trainer.device=cpu"]
    d1 = execute(compose([f"out_dir={tmp_path}/a", *ov]), quiet=True)
    d2 = execute(compose([f"out_dir={tmp_path}/b", *ov]), quiet=True)
    m1 = pd.read_csv(tmp_path / "a" / d1["run_id"][0] / "metrics.csv")
    m2 = pd.read_csv(tmp_path / "b" / d2["run_id"][0] / "metrics.csv")
    pd.testing.assert_frame_equal(m1, m2)
    d3 = execute(compose([f"out_dir={tmp_path}/c", "seed=1", *ov]), quiet=True)
    assert not d3["test_loss"].equals(d1["test_loss"])


def test_run_directory_contents_and_finished_run_is_reused(tmp_path, capsys):
    cfg = compose([f"out_dir={tmp_path}", "method=dense", "trainer.epochs=1"])
    df = execute(cfg)
    run = tmp_path / df["run_id"][0]
    for f in ("config.yaml", "metrics.csv", "summary.csv", "summary.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "summary.json").read_text())[0]["method"] == "dense"
    mtime = (run / "summary.csv").stat().st_mtime_ns
    df2 = execute(cfg)
    assert "already finished" in capsys.readouterr().out
    assert (run / "summary.csv").stat().st_mtime_ns == mtime
    assert df2["test_acc"][0] == df["test_acc"][0]


def test_main_job_runs_and_prints_the_table(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), f"out_dir={tmp_path}",
                        f"results_csv={tmp_path}/main.csv"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "round" in p.stdout and "density" in p.stdout and "test_acc" in p.stdout
    df = pd.read_csv(tmp_path / "main.csv")
    assert len(df) == 11 and df["density"].is_monotonic_decreasing
    assert df["test_acc"].iloc[0] > 0.9  # Digits MLP


def test_new_keys_at_their_noop_default_keep_the_hash(monkeypatch):
    from sparsebench import config

    cfg = validate(compose(["seed=0"]))
    h = config_hash(cfg)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.trainer.brand_new_switch = False
    assert config_hash(cfg) != h
    monkeypatch.setitem(config.NOOP_DEFAULTS, "trainer.brand_new_switch", False)
    assert config_hash(cfg) == h
