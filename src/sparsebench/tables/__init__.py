"""Paper tables: specs in ``experiments/<ID>.yaml``, shared settings in ``conf/experiment/`` presets,
builders by document, CSVs in ``results/``.

* :mod:`~sparsebench.tables.spec`: load / validate a spec, expand its rows (and sweeps) into cells;
* :mod:`~sparsebench.tables.runner`: run the cells through ``sparsebench.api`` and write the table;
* :mod:`~sparsebench.tables.schema`: the long-format columns (:data:`~sparsebench.tables.schema.TABLE_COLUMNS`);
* :mod:`~sparsebench.tables.figures`: matplotlib helpers (atomic ``results/<ID>.png``);
* ``builders/t000.py ... t004.py``: ``builder(spec, runs) -> DataFrame`` per document.

``results/README.md`` describes the spec format and the recipe for a new table.
"""
