# Two commands, each doing its own set-up on a fresh machine:
#   make demo   fine-tune LoRA on a real pretrained model and real data, end to end
#   make test   install the test extras and run the suite (.ci/run calls exactly this)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
CHECK_TORCH := $(PY) -c 'import torch, sys; ok = torch.__version__ == "2.13.0+cpu" and torch.version.cuda is None; \
  print("torch", torch.__version__, "OK" if ok else "WRONG BUILD: expected 2.13.0+cpu, a CUDA torch was pulled in"); sys.exit(not ok)'

# Offline, CPU-only runtime: no model hub, DeepSpeed on its CPU accelerator, no Ray telemetry.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test setup setup-test benchmark clean

demo: $(VENV)/.installed
	$(PY) -m orchestrator.demo

test: $(VENV)/.installed-test
	$(PY) -m ruff check .  # lint first: line length, import order, pyflakes (pyproject.toml)
	$(PY) -m pytest -q --ignore=tests/cluster
	$(PY) -m pytest -q tests/cluster  # its own process: a multi-node Ray cluster of its own

benchmark: $(VENV)/.installed
	$(PY) benchmarks/training_memory.py

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# torch first, from the CPU wheel on local disk; then everything else constrained to that exact
# build so no dependency can swap in a multi-GB CUDA torch.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/no-deps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -c requirements/constraints.txt -e .
	$(PIP) install --quiet --no-deps -r requirements/no-deps.txt
	$(CHECK_TORCH)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed tests/plugins/peftfleet_example_plugin/pyproject.toml
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[test]' -e tests/plugins/peftfleet_example_plugin
	$(CHECK_TORCH)
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
