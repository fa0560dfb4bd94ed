# sparsebench: `make run` (install + main job), `make test` (install + tests), `make table-<ID>`, `make tables`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.install-stamp
# real MNIST lives in ../shared/data on the project machines; override with SPARSEBENCH_DATA=...
export SPARSEBENCH_DATA ?= $(if $(wildcard ../shared/data/MNIST/raw),$(abspath ../shared/data),$(abspath data))

.PHONY: install run test tables help
help:
	@echo "make run | make test | make tables | make table-<ID> [QUICK=1] [SEEDS=0,1] | make table-full-<ID> (see results/README.md)"

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ---------------------------------------------------------------- tables (one target per ID)
# make table-<ID>: the spec's document setting (its `setting` preset); QUICK=1: plus its quick preset;
# make table-full-<ID>: the document's full setting (its `full` preset, e.g. WRN-28x5 on CIFAR-100 for T001-*).
# SEEDS=0,1 and OUT=dir are passed on as --seeds / --out.
TABLE_IDS := $(sort $(patsubst experiments/%.yaml,%,$(wildcard experiments/T*.yaml)))
TABLE_ARGS = $(if $(QUICK),--quick) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(OUT),--out $(OUT))

tables: $(addprefix table-,$(TABLE_IDS))

table-full-%: $(STAMP)
	$(BIN)/python scripts/make_table.py --full $(if $(SEEDS),--seeds $(SEEDS)) $(if $(OUT),--out $(OUT)) $*

table-%: $(STAMP)
	$(BIN)/python scripts/make_table.py $(TABLE_ARGS) $*
