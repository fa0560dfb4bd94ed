# sparsebench: `make run` (install + main job), `make test` (install + tests), `make table-<ID>`, `make tables`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.install-stamp
# real MNIST lives in ../shared/data on the project machines; override with SPARSEBENCH_DATA=...
export SPARSEBENCH_DATA ?= $(if $(wildcard ../shared/data/MNIST/raw),$(abspath ../shared/data),$(abspath data))

.PHONY: install run test tables help
help:
	@echo "make run | make test | make tables | make table-<ID> (see results/README.md)"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ---------------------------------------------------------------- tables (one target per ID)
TABLE_IDS := $(shell $(PY) -c "import re,pathlib;print(' '.join(sorted(p.stem for p in pathlib.Path('experiments').glob('T*.yaml'))))" 2>/dev/null)

tables: $(addprefix table-,$(TABLE_IDS))

# the document's full setting (e.g. WRN-28x5 on CIFAR-100 for T001-*): make table-full-T001-3.1
table-full-%: $(STAMP)
	$(BIN)/python scripts/make_table.py --full $*

table-%: $(STAMP)
	$(BIN)/python scripts/make_table.py $*
