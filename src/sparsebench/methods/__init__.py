"""Method registry. Importing this package registers every built-in method.

A method is a :class:`~sparsebench.methods.base.Method` subclass registered with
``@METHODS.register(name, schema=ConfigDataclass)``; ``method.name`` in the config selects it.
One module per family:

* :mod:`.dense`: ``dense``;
* :mod:`.post_training`: ``magnitude``, ``unit_prune``, ``ls_unit_prune``, ``randomized_prune``;
* :mod:`.lottery`: ``lth_imp``, ``lth_imp_neurons``;
* :mod:`.at_init`: ``random_prune``, ``snip``;
* :mod:`.sparse_training`: ``dynamic_sparse`` (presets ``set``, ``rigl``, ``faiss_grow``), ``static_sparse``,
  ``dst_masked``;
* :mod:`.lpa`: the label-propagation methods;
* :mod:`.timing`: ``forward_time``.
"""
from sparsebench.core.registry import Registry

METHODS: Registry = Registry("method.name")

from sparsebench.methods import base  # noqa: E402,F401
from sparsebench.methods import at_init, dense, lottery, lpa, post_training, sparse_training, timing  # noqa: E402,F401
