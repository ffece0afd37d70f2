# The two commands of the README: `make book` (main job) and `make test`. Both create the venv if missing.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= quick
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The data root: DATA_DIR=... on the command line, else $MTLCORE_DATA_DIR, else the user cache (mtlcore decides).
ifdef DATA_DIR
export MTLCORE_DATA_DIR := $(abspath $(DATA_DIR))
endif

.PHONY: book test venv bench clean-book clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dask]'
	@# compile the CPU kernels now (~1 min, side by side, cached under ~/.cache/torch_extensions) rather than in the first run
	$(BIN)/python -c "from mtlcore.models import fused; print('LeNet CPU kernels:', fused.kernel_name())" & pid=$$!; \
	$(BIN)/python -c "from mtlcore.aggregators import base; print('Jacobian CPU kernels:', base.jacobian_kernels())" \
	&& wait $$pid
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/mtlcore batch --profile $(PROFILE)
	rm -rf book/_build
	$(BIN)/jupyter-book build book --warningiserror --keep-going
	@echo "book: $(CURDIR)/book/_build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_training.py

clean-book:
	rm -rf book/_build book/*.ipynb book/_generated

clean: clean-book
	rm -rf $(VENV) results
