"""Dynamic sparse training: a sparse network whose topology is updated while it trains.

The flow of ``method=dynamic_sparse`` (:mod:`sparsebench.methods.sparse_training`): random masks at
``method.density`` under ``method.distribution`` (:mod:`sparsebench.sparsity.distributions`), then
training with a :class:`~sparsebench.dst.updater.DSTUpdater` callback that every ``ΔT`` steps until
``T_end`` drops the smallest ``|w|`` of each layer and grows as many positions chosen by the grow
criterion ``method.grow``. One module per concept:

* :mod:`~sparsebench.dst.schedules`: drop-fraction anneals ``d(t)`` (``constant``, ``cosine``).
* :mod:`~sparsebench.dst.selection`: exact top-n, random growable positions, optimizer-state reset.
* :mod:`~sparsebench.dst.grow`: grow criteria ``random`` (SET), ``gradient`` (RigL),
  ``similarity`` (thesis 001); a criterion returns grow scores or positions.
* :mod:`~sparsebench.dst.similarity` / :mod:`~sparsebench.dst.search`: the similarity metrics
  (``abs_ip``, ``l2``, ``lsh``) and searches (``brute``, ``faiss``) of ``grow=similarity``.
* :mod:`~sparsebench.dst.capture`: the per-batch layer inputs and output gradients it searches.
* :mod:`~sparsebench.dst.updater`: the one generic drop/grow update.
* :mod:`~sparsebench.dst.threshold`: trainable-threshold masks (``method=dst_masked``, Liu et al. 2020).

Importing this package imports nothing; import the module you need.
"""
