"""Graph-based semi-supervised learning (document 000): k-NN graphs and label spreading.

One module per concept, in pipeline order: :mod:`~sparsebench.graph.pca` (scaling, PCA solvers),
:mod:`~sparsebench.graph.backends` (k-NN search strategies, registry ``GRAPH_BACKENDS``),
:mod:`~sparsebench.graph.knn` (``knn_graph``, ``knn_search``, recall, the kNN classifier),
:mod:`~sparsebench.graph.affinity` (edge weights, ``S = D^-1/2 W D^-1/2``),
:mod:`~sparsebench.graph.spreading` (propagation solvers, seed labels) and
:mod:`~sparsebench.graph.estimator` (``LabelSpreading``, the whole pipeline as a scikit-learn estimator).
"""
