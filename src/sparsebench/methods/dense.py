"""``method=dense``: plain dense training (the reference row of every table)."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sparsebench.config import MethodConfig
from sparsebench.methods import METHODS
from sparsebench.methods.base import Method


@dataclass
class DenseConfig(MethodConfig):
    name: str = "dense"


@METHODS.register("dense", schema=DenseConfig)
class Dense(Method):
    """Train the dense network; one summary row with density 1."""

    def run(self) -> pd.DataFrame:
        model = self.ctx.new_model()
        final = self.ctx.trainer(model).fit()
        return pd.DataFrame([self.row(density=1.0, **final)])
