# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is needed on first use (idempotent: a second
# call finds the stamp and installs nothing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.libmoe-installed
TORCH_DEFAULT := torch==2.13.0

.PHONY: setup test test-fast lint demo demo-clean lab bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Keep a torch the user already has (e.g. a CUDA build); install the CPU default otherwise.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_DEFAULT)
	@# Pin whatever torch is present so no dependency can swap it for another build; lmms-eval
	@# needs filelock<4. With the CPU torch 2.13.0, PyPI's torchvision cannot load and breaks
	@# transformers, so it is removed after the install (libmoe-kit and lmms-eval's CLI run without it).
	@$(PY) -c "import torch; v = torch.__version__; print('torch==' + v); print('torchvision==0.28.0' if v.startswith('2.13.0') else '')" > $(VENV)/constraints.txt
	@echo "filelock<4" >> $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,eval]"
	@$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision 2>/dev/null || true
	@$(PY) -c "import transformers.models.siglip, lmms_eval" || (echo "set-up check failed: transformers/lmms-eval do not import"; exit 1)
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
