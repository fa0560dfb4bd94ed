"""Run identity, determinism, run directory contents, stored-result reuse, the main job."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sparsebench.api import compose, execute, validate
from sparsebench.config.identity import config_hash, hashable_config

ROOT = Path(__file__).resolve().parents[1]


def test_hash_of_fixed_config_never_changes():
    # if this fails, a change altered run identity: a new key's schema default must keep the old behaviour,
    # and a schema default must not change
    cfg = validate(compose(["method=dense", "dataset=digits", "model=mlp", "seed=0"]))
    assert hashable_config(cfg) == {"method": {"name": "dense"}}  # everything else at its schema default
    assert config_hash(cfg) == FIXED_HASH
    cfg = validate(compose(["method=dense", "dataset=mnist", "model=lenet300_100", "seed=3", "trainer.lr=0.05"]))
    assert hashable_config(cfg) == {"seed": 3, "method": {"name": "dense"}, "trainer": {"lr": 0.05},
                                    "dataset": {"name": "mnist", "val_fraction": 0.0833333},
                                    "model": {"name": "lenet300_100", "hidden": [300, 100]}}
    assert config_hash(cfg) == FIXED_HASH_2


FIXED_HASH = "b7a589ab0c99"
FIXED_HASH_2 = "399eff014a46"


def test_hash_ignores_logging_paths_and_device_but_not_seed():
    a = validate(compose(["out_dir=/tmp/a", "trainer.device=cpu"]))
    b = validate(compose(["out_dir=/tmp/b", "trainer.device=auto", "logger=wandb", "table=T003-imp"]))
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


def test_a_new_key_at_its_schema_default_keeps_the_hash():
    import dataclasses

    from omegaconf import OmegaConf

    from sparsebench.config import validation
    from sparsebench.methods import METHODS

    cfg = OmegaConf.create(OmegaConf.to_container(compose(["seed=0"])))  # untyped, so another schema applies
    base = METHODS.schema("lth_imp")
    extended = dataclasses.make_dataclass("Extended", [("brand_new_switch", bool, False)], bases=(base,))
    schemas = {**{n: METHODS.schema(n) for n in METHODS.names()}, "lth_imp": extended}
    h = config_hash(validate(cfg))
    assert config_hash(validation.validate(cfg, method_schemas=schemas)) == h
    cfg.method.brand_new_switch = True  # not at its default: part of the identity
    assert config_hash(validation.validate(cfg, method_schemas=schemas)) != h


def test_hash_needs_the_validated_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(validate(compose([]))))  # schema types dropped
    with pytest.raises(TypeError, match="validated config"):
        config_hash(cfg)


def test_derive_seed_is_stable_and_name_dependent():
    from sparsebench.core.seeding import derive_seed

    assert derive_seed(0, "mask_init") == derive_seed(0, "mask_init") == DERIVED
    assert len({derive_seed(0, "mask_init"), derive_seed(1, "mask_init"), derive_seed(0, "data")}) == 3
    assert 0 <= derive_seed(-5, "x") < 2**63


DERIVED = int.from_bytes(__import__("hashlib").sha256(b"0:mask_init").digest()[:8], "big") & (2**63 - 1)


def test_thread_count_is_restored_after_a_run(tmp_path):
    import torch

    from sparsebench.core.threads import torch_threads

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other) as n:
        assert n == torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    execute(compose([f"out_dir={tmp_path}", "method=dense", "trainer.epochs=1", f"trainer.num_threads={other}"]),
            quiet=True)
    assert torch.get_num_threads() == before
