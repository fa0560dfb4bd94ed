"""ERK per-layer densities against google-research/rigl's ``get_sparsities_erdos_renyi`` (issue 15).

The oracle below re-implements the published loop of ``rigl/sparse_utils.py`` (Evci et al. 2020,
"Rigging the Lottery"): start with every layer free, solve
``eps * sum_free(p_l N_l) = sum_free(N_l - floor(s N_l)) - sum_dense(floor(s N_l))`` with
``p_l = (sum(shape) / prod(shape)) ** power`` (``s`` = sparsity = 1 - density), and while
``eps * max(p_l) > 1`` move the layer(s) with the largest ``p_l`` into the dense set and solve again.
It works on shapes only (TF kernels are (kh, kw, in, out), torch weights (out, in, kh, kw): sum and
product do not depend on the order).

Our :func:`sparsebench.sparsity.distributions.layer_densities` rounds to whole weights (largest
remainder, global count ``round(density * N)``), so each layer is compared to the oracle within
one weight of that layer (``1 / numel``).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import pytest

from sparsebench.config.schemas import ModelConfig
from sparsebench.models import build_model
from sparsebench.sparsity.distributions import layer_densities
from sparsebench.sparsity.masking import Masking

DENSITIES = (0.5, 0.2, 0.1, 0.05)
MODELS = {  # name -> (ModelConfig kwargs, input shape, classes)
    "lenet300_100": (dict(name="lenet300_100", hidden=[300, 100]), (784,), 10),
    "fc5": (dict(name="fc5", hidden=[1000, 1000, 500, 200]), (784,), 10),
    "wrn28x5": (dict(name="wrn28x5", arch="wrn", depth=28, width=5), (3, 32, 32), 10),
}


def rigl_erdos_renyi_densities(shapes: Dict[str, Tuple[int, ...]], density: float, include_kernel: bool = True,
                               erk_power_scale: float = 1.0) -> Dict[str, float]:
    """Oracle: google-research/rigl ``sparse_utils.get_sparsities_erdos_renyi`` (no custom sparsities),
    returned as densities ``1 - sparsity`` per layer."""
    sparsity = 1.0 - density
    dense_layers = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n_param = int(np.prod(shape))
            n_zeros = int(np.floor(sparsity * n_param))
            if name in dense_layers:
                rhs -= n_zeros
            else:
                rhs += n_param - n_zeros
                if include_kernel:
                    raw[name] = (np.sum(shape) / np.prod(shape)) ** erk_power_scale
                else:
                    n_in, n_out = shape[:2]  # torch (out, in, ...) = TF's last two (in, out)
                    raw[name] = (n_in + n_out) / (n_in * n_out)
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense_layers.update(n for n, p in raw.items() if p == max_prob)
        else:
            break
    return {n: 1.0 if n in dense_layers else eps * raw[n] for n in shapes}


def _masking(model: str) -> Masking:
    kw, input_shape, classes = MODELS[model]
    return Masking(build_model(ModelConfig(**kw), input_shape, classes))


@pytest.fixture(scope="module")
def maskings():
    return {m: _masking(m) for m in MODELS}


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("model", list(MODELS))
def test_erk_matches_rigl_get_sparsities_erdos_renyi(maskings, model, density):
    masking = maskings[model]
    shapes = {n: tuple(w.shape) for n, w, _ in masking.items()}
    oracle = rigl_erdos_renyi_densities(shapes, density)
    ours = layer_densities(masking, density, "erk")
    assert list(ours) == list(oracle)
    for name, shape in shapes.items():
        tol = 1.0 / math.prod(shape)  # measured worst: 0.86 of a weight (WRN, 0.5)
        assert ours[name] == pytest.approx(oracle[name], abs=tol), (model, density, name)
    # the oracle meets the global budget (as a sanity check of the oracle itself)
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(oracle[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(density * total, abs=len(shapes) + 1)


def test_oracle_saturates_layers_at_low_sparsity(maskings):
    """At density 0.5 ERK must make some small layers dense (the branch the loop exists for)."""
    for model in ("lenet300_100", "wrn28x5"):
        shapes = {n: tuple(w.shape) for n, w, _ in maskings[model].items()}
        dens = rigl_erdos_renyi_densities(shapes, 0.5)
        assert any(d == 1.0 for d in dens.values()), model
        assert all(0.0 < d <= 1.0 for d in dens.values())


def test_comparison_can_fail(maskings):
    """The tolerance is tight enough to tell ER (no kernel dims) from ERK, and a one-percent error."""
    masking = maskings["wrn28x5"]
    shapes = {n: tuple(w.shape) for n, w, _ in masking.items()}
    ours = layer_densities(masking, 0.1, "erk")
    er = rigl_erdos_renyi_densities(shapes, 0.1, include_kernel=False)
    assert any(abs(ours[n] - er[n]) > 1.0 / math.prod(s) for n, s in shapes.items())
    oracle = rigl_erdos_renyi_densities(shapes, 0.1)
    big = max(shapes, key=lambda n: math.prod(shapes[n]))
    assert abs(ours[big] * 1.01 - oracle[big]) > 1.0 / math.prod(shapes[big])
