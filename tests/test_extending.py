"""The docs/extending.md recipes for a dataset and a method, each added here in a few lines."""
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from sparsebench.api import compose, execute, validate
from sparsebench.config import MethodConfig, check_density
from sparsebench.core.errors import ConfigError
from sparsebench.data.registry import DATASETS, DataBundle, DatasetInfo, Split, register_dataset
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method


def _load_blobs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(90) % 3
    x = torch.randn(90, 2, generator=g) * 0.3 + torch.stack([y.float(), -y.float()], 1) * 2

    def part(s):
        return Split(x[s].contiguous(), y[s].contiguous())

    return DataBundle(cfg.name, "tabular", part(slice(0, 60)), part(slice(60, 75)), part(slice(75, 90)), 3)


@pytest.fixture
def blobs():
    if "toy_blobs" not in DATASETS:
        register_dataset("toy_blobs", DatasetInfo(kind="tabular", num_classes=3, input_shape=(2,), load=_load_blobs,
                                                  source="test"))
    yield "toy_blobs"


def test_toy_dataset_is_selectable_by_config(blobs, tmp_path):
    cfg = compose(["dataset=iris", f"dataset.name={blobs}", "method=dense", "trainer.epochs=40",
                   f"out_dir={tmp_path}", "trainer.device=cpu"])
    df = execute(cfg, quiet=True)
    assert df["test_acc"].iloc[0] > 0.9  # three well-separated blobs
    with pytest.raises(ConfigError, match="dataset.name"):
        validate(compose(["dataset=iris", "dataset.name=not_a_dataset", "method=dense", f"out_dir={tmp_path}"]))


@dataclass
class _PruneAfterConfig(MethodConfig):
    name: str = "toy_prune_after"
    density: float = 0.25

    def __post_init__(self):
        check_density("method.density", self.density)


class _PruneAfter(Method):
    def run(self):
        from sparsebench.sparsity.selection import magnitude_masks

        model = self.ctx.new_model()
        masking = self.ctx.masking(model)
        final = self.ctx.trainer(model, masking).fit()
        masking.set_masks(magnitude_masks(masking, self.cfg.density))
        return pd.DataFrame([self.row(density=masking.density(), **final)])


def test_toy_method_runs_through_the_shared_trainer(tmp_path, monkeypatch):
    import shutil

    import sparsebench.api as api

    if "toy_prune_after" not in METHODS:
        METHODS.register("toy_prune_after", schema=_PruneAfterConfig)(_PruneAfter)
    conf = tmp_path / "conf"
    shutil.copytree(api.CONF_DIR, conf)
    (conf / "method" / "toy_prune_after.yaml").write_text("defaults:\n  - _schema_toy_prune_after\n  - _self_\n")
    monkeypatch.setattr(api, "CONF_DIR", conf)
    cfg = validate(compose(["dataset=iris", "method=toy_prune_after", "trainer.epochs=2", f"out_dir={tmp_path}",
                            "trainer.device=cpu"]))
    df = execute(cfg, quiet=True)
    assert np.isclose(df["density"].iloc[0], 0.25, atol=0.01)
    run_dir = next(p for p in tmp_path.iterdir() if (p / "summary.csv").exists())
    assert (run_dir / "checkpoints").is_dir()  # trained through the shared trainer: it checkpoints
    with pytest.raises(ConfigError, match="method.density"):
        validate(compose(["dataset=iris", "method=toy_prune_after", "method.density=1.5", f"out_dir={tmp_path}"]))
