"""Similarity metrics between a layer's per-batch output-gradient and input vectors (thesis 001, ch. 3).

``dL/dW_ji = sum_b dL/dz_bj * x_bi = <g_j, u_i>``: the largest ``|dL/dW|`` are the most similar pairs of
the two vector groups (``G`` ``(R, n_out)``, ``U`` ``(R, n_in)``, see :func:`sparsebench.dst.capture.layer_vectors`).
Registry :data:`METRICS` (``method.metric``):

* ``abs_ip``: ``|<g_j, u_i>|`` (exactly ``|dL/dW|``); faiss ``IndexFlatIP`` searched with ``q`` and ``-q``.
* ``l2``: ``-||g_j - u_i||^2`` (thesis Table 3.2); faiss ``IndexFlatL2``.
* ``lsh``: faiss ``IndexLSH`` (``nbits = bits * R``), hamming distance of random-rotation sign codes
  (approximates the angle); judged against the exact ``|inner product|``; no brute-force form.

Each metric carries its metadata: ``signs`` (query signs for faiss), ``brute_force`` (has an exact
``(n_out, n_in)`` score matrix a brute-force search can rank), ``is_weight_gradient`` (that matrix is
``|weight.grad|``, so an exact search may read autograd's gradient instead), ``flat_index`` (its faiss
index is exhaustive, so :meth:`SimilarityMetric.signed_scores` is every score the index would
compare), and builds itself from the flat ``method.*`` parameters (:meth:`SimilarityMetric.from_params`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.core.registry import Registry

METRICS: Registry = Registry("method.metric")


class SimilarityMetric:
    """Similarity between gradient vectors ``g_j`` and input vectors ``u_i`` (higher = grow first).

    Attributes:
        signs: query signs used with faiss (``(1, -1)`` turns a signed inner product into |.|).
        brute_force: :meth:`exact` is a score a brute-force search may rank (False: approximate index only).
        is_weight_gradient: :meth:`exact` equals ``|dL/dW|`` of the layer (``|G^T U|``).
        flat_index: :meth:`index` is an exhaustive (``IndexFlat*``) faiss index: for the query
            ``sign * u_i`` it returns the exact top-k over ``j`` of ``sign * signed_scores(G, U)[j, i]``
            (after :meth:`from_faiss`), so one matrix product can stand in for the index (same set).
    """

    signs: Tuple[int, ...] = (1,)
    brute_force = True
    is_weight_gradient = False
    flat_index = False

    @classmethod
    def from_params(cls, bits: float = 1.0) -> "SimilarityMetric":
        """Build from the flat ``method.*`` similarity parameters (only ``lsh`` reads ``bits``)."""
        return cls()

    def exact(self, G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """``(n_out, n_in)`` exact similarity of every pair (brute force)."""
        raise NotImplementedError

    def reference(self, G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """The exact score approximate search is judged against (recall)."""
        return self.exact(G, U)

    def signed_scores(self, G: torch.Tensor, U: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(n_out, n_in)`` scores ``S`` with: the faiss index of the ``g_j`` queried with ``sign * u_i``
        scores ``g_j`` as ``sign * S[j, i]`` (after :meth:`from_faiss`), for every ``sign`` in :attr:`signs`.
        Only metrics with :attr:`flat_index` define it (``G``'s dtype and device). ``out``: an optional
        ``(n_out, n_in)`` buffer of that dtype and device the result may be written into (and returned)."""
        raise NotImplementedError(f"{type(self).__name__} has no flat (exhaustive) faiss index")

    def index(self, dim: int):
        """A fresh faiss index for ``dim``-dimensional vectors."""
        raise NotImplementedError

    def from_faiss(self, D: np.ndarray) -> np.ndarray:
        """Turn faiss' returned distances/scores into similarities (higher = better)."""
        return D


@METRICS.register("abs_ip")
class AbsInnerProduct(SimilarityMetric):
    """``|<g_j, u_i>| = |dL/dW_ji|``; faiss ``IndexFlatIP`` searched with ``q`` and ``-q``."""

    signs = (1, -1)
    is_weight_gradient = True
    flat_index = True

    def exact(self, G, U):
        return (G.t() @ U).abs_()

    def signed_scores(self, G, U, out=None):  # <g_j, s * u_i> = s * (G^T U)[j, i]
        return torch.mm(G.t(), U, out=out) if out is not None else G.t() @ U

    def index(self, dim):
        import faiss

        return faiss.IndexFlatIP(dim)


@METRICS.register("l2")
class L2Similarity(SimilarityMetric):
    """``-||g_j - u_i||^2`` (thesis Table 3.2); faiss ``IndexFlatL2``."""

    flat_index = True

    def signed_scores(self, G, U, out=None):  # one query sign: the exact score
        return self.exact(G, U)

    def exact(self, G, U):
        g2 = (G * G).sum(0)[:, None]
        u2 = (U * U).sum(0)[None, :]
        return (G.t() @ U).mul_(2).sub_(g2).sub_(u2)

    def index(self, dim):
        import faiss

        return faiss.IndexFlatL2(dim)

    def from_faiss(self, D):
        return -D


@METRICS.register("lsh")
class LSHSimilarity(SimilarityMetric):
    """faiss ``IndexLSH(d, nbits = bits * d, rotate_data=True)``: hamming distance of sign codes after a
    random rotation (approximates the angle between vectors), searched with ``q`` and ``-q``;
    judged against the exact ``|inner product|``. No brute-force form (use ``metric=abs_ip``).

    Raises:
        ConfigError: the rotation matrix would exceed ``max_rotation_gib`` (set ``method.max_rows``).
    """

    signs = (1, -1)
    brute_force = False
    max_rotation_gib = 2.0

    def __init__(self, bits: float = 1.0):
        self.bits = float(bits)

    @classmethod
    def from_params(cls, bits: float = 1.0) -> "LSHSimilarity":
        return cls(bits)

    def exact(self, G, U):  # the hash-free reference
        return (G.t() @ U).abs_()

    def index(self, dim):
        import faiss

        nbits = max(1, int(round(self.bits * dim)))
        gib = dim * nbits * 4 / 2**30
        if gib > self.max_rotation_gib:
            raise ConfigError(f"method.bits={self.bits}: the LSH rotation for vectors of dimension {dim} would need "
                              f"{gib:.1f} GiB; set method.max_rows (subsample of batch x positions) or lower bits")
        return faiss.IndexLSH(dim, nbits, True, False)

    def from_faiss(self, D):
        return -D
