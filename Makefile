# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is needed on first use (idempotent: a second
# call finds the stamp and installs nothing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.libmoe-installed
TORCH_DEFAULT := torch==2.13.0
# Index for that torch install only (empty: pip's configured index; PyPI's Linux wheel of torch 2.13.0 is
# the CUDA build). CPU-only machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup test test-fast lint demo demo-clean lab bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# (Re)create the venv unless it has a working pip (a first set-up that was interrupted, or whose
	@# ensurepip failed, leaves python without pip). When $(PYTHON) already has a torch (e.g. a CUDA
	@# build), the venv sees it (--system-site-packages) and it is kept, pinned below.
	@$(PY) -m pip --version >/dev/null 2>&1 || { \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "$(PYTHON) has torch $$($(PYTHON) -c 'import torch; print(torch.__version__)'): creating $(VENV) with --system-site-packages to keep it"; \
	    $(PYTHON) -m venv --clear --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv --clear $(VENV); fi; }
	@$(PY) -m pip install -q --upgrade pip
	@# Keep a torch the venv already sees; install the default otherwise. (A venv sees the packages of
	@# $(PYTHON)'s base installation only: a torch in a virtualenv that $(PYTHON) belongs to stays out.)
	@$(PY) -c "import torch" 2>/dev/null || { \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "note: $(VENV) does not see the torch of $(PYTHON), so $(TORCH_DEFAULT) is installed: $(PYTHON) is a virtual environment (a venv sees only its base installation's packages; run with PYTHON=<a base interpreter with torch>, or pip install -e '.[dev,eval]' in that environment), or $(VENV) was made before that torch was installed (make clean-venv, then again)"; fi; \
	  $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_DEFAULT); }
	@# Pin whatever torch is present so no dependency can swap it for another build; lmms-eval
	@# needs filelock<4. With the CPU torch 2.13.0, PyPI's torchvision cannot load and breaks
	@# transformers, so it is removed after the install (libmoe-kit and lmms-eval's CLI run without it).
	@$(PY) -c "import torch; v = torch.__version__; print('torch==' + v); print('torchvision==0.28.0' if v.startswith('2.13.0') else '')" > $(VENV)/constraints.txt
	@echo "filelock<4" >> $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,eval]"
	@$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision 2>/dev/null || true
	@# What the kit needs to import (transformers 5.24 disables a torch < 2.6, and the model then fails here).
	@$(PY) -c "import libmoe_core.model.modeling, lmms_eval" || (echo "set-up check failed: libmoe_core.model.modeling or lmms_eval does not import (see above)"; exit 1)
	@$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (libmoe-kit)" >/dev/null
	@touch $@

test: setup
	$(PY) -m pytest tests notebooks/tutorials --nbval-lax --nbval-cell-timeout=1200 --durations=25

test-fast: setup
	$(PY) -m pytest -m "not slow"

# ruff, pinned in the dev extra (pyproject.toml holds the rule set); CI runs it before the tests.
lint: setup
	$(PY) -m ruff check .

# The whole pipeline on the embedded default: tiny preset, easy-VQA, two routers, evaluation on
# 1,000 test questions, the analysis notebooks; ends with the accuracy table. Resumable: a second
# call skips finished stages (`make demo-clean` starts over).
DEMO_ROUTERS ?= smoe sigmoid
demo: setup
	$(PY) -m libmoe_core.cli pipeline --preset tiny $(foreach r,$(DEMO_ROUTERS),--router $(r)) --run-name demo --set eval.limit=1000

demo-clean:
	rm -rf runs/demo

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PY) benchmarks/moe_layer.py

clean-venv:
	rm -rf $(VENV)
