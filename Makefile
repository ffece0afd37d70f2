# The two commands of the README: `make book` (main job) and `make test`. Both create the venv if missing.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= quick
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's tools first: torch compiles lenet_fused's kernel with the `ninja` that pip installs there.
export PATH := $(abspath $(BIN)):$(PATH)
# The data root: DATA_DIR=... on the command line, else $MTLCORE_DATA_DIR, else the user cache (mtlcore decides).
ifdef DATA_DIR
export MTLCORE_DATA_DIR := $(abspath $(DATA_DIR))
endif

.PHONY: book html test venv bench clean-book clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "mtlcore needs Python >= 3.11 and '$(PYTHON)' is older: run make with PYTHON=python3.11 (or newer)" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dask]'
	@# compile lenet_fused's CPU kernel now (cached under ~/.cache/torch_extensions) rather than in the first run
	$(BIN)/python -c "from mtlcore.settings.fashion_mtl import fused; print('lenet_fused CPU kernel:', fused.kernel_name())"
	touch $(STAMP)

# Execute the notebooks of a profile (training the runs they need), then render them.
book: $(STAMP)
	$(BIN)/mtlcore batch --profile $(PROFILE)
	@$(MAKE) --no-print-directory html

# Render the notebooks executed into book/; jupyter-book executes first, with $(PROFILE), the chapters that are not
# there (on a fresh clone: all of them).
html: $(STAMP)
	rm -rf book/_build
	MTLCORE_PROFILE=$(PROFILE) $(BIN)/jupyter-book build book --warningiserror --keep-going
	@echo "book: $(CURDIR)/book/_build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_training.py

clean-book:
	rm -rf book/_build book/*.ipynb book/_generated

clean: clean-book
	rm -rf $(VENV) results
