# Two commands, each doing its own set-up on a fresh machine:
#   make demo   fine-tune LoRA on a real pretrained model and real data, end to end
#   make test   install the test extras and run the suite (.ci/run calls exactly this)
# On a GPU machine:
#   make setup-gpu   a CUDA build of the same torch, then peftfleet and its test extras, in .venv-gpu
#                    (GPU_VENV=...); PyPI's torch 2.13.0 Linux wheel is a CUDA 13.0 build. For another CUDA:
#                    make setup-gpu TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#   make smoke-cpu   the CPU-possible parts of benchmarks/gpu_smoke.sh (the GPU smoke script)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
TORCH := torch==$(TORCH_VERSION)
CHECK_TORCH := $(PY) -c 'import torch, sys; ok = torch.__version__ == "$(TORCH_VERSION)+cpu" and torch.version.cuda is None; \
  print("torch", torch.__version__, "OK" if ok else "WRONG BUILD: expected $(TORCH_VERSION)+cpu, a CUDA torch was pulled in"); sys.exit(not ok)'

# The GPU install lives in its own venv so that the CPU one (and its guard) stays as it is.
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_PIP := $(GPU_PY) -m pip
# Empty: the index pip is configured with (PyPI). Set it to a PyPI mirror or to PyTorch's index
# for one CUDA (https://download.pytorch.org/whl/cu128, .../cu130) to match the machine's CUDA.
TORCH_INDEX_URL ?=
TORCH_INDEX = $(if $(TORCH_INDEX_URL), --index-url $(TORCH_INDEX_URL))
# A build check, not a device check: it passes on a machine without a driver, and says what it sees.
CHECK_TORCH_GPU := $(GPU_PY) -c 'import torch, sys; \
  ok = torch.__version__.split("+")[0] == "$(TORCH_VERSION)" and torch.version.cuda is not None; \
  print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs visible:", torch.cuda.device_count(), \
  "OK" if ok else "WRONG BUILD: expected a CUDA build of $(TORCH_VERSION) (a CPU wheel from a local find-links?)"); \
  sys.exit(not ok)'

# Offline, CPU-only runtime: no model hub, DeepSpeed on its CPU accelerator, no Ray telemetry.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test setup setup-test setup-gpu benchmark smoke-cpu clean

demo: $(VENV)/.installed  # make demo VERBOSE=1: Ray's, DeepSpeed's and transformers' logs in the terminal too
	$(PY) -m orchestrator.demo$(if $(VERBOSE), --verbose)

test: $(VENV)/.installed-test
	$(PY) -m ruff check .  # lint first: line length, import order, pyflakes (pyproject.toml)
	$(PY) -m pytest -q --ignore=tests/cluster
	$(PY) -m pytest -q tests/cluster  # its own process: a multi-node Ray cluster of its own

benchmark: $(VENV)/.installed
	$(PY) benchmarks/training_memory.py

# The GPU smoke script's parts a CPU can run (bf16 on DeepSpeed's CPU accelerator); on a GPU machine
# run `bash benchmarks/gpu_smoke.sh` itself (docs/benchmarks.md#gpu-smoke).
smoke-cpu: $(VENV)/.installed
	bash benchmarks/gpu_smoke.sh --cpu --parts env,methods,recipe

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test
setup-gpu: $(GPU_VENV)/.installed-gpu

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

# The GPU venv: torch first (constraints-gpu.txt pins the same version and refuses the +cpu wheel,
# which may lie in a local find-links), checked before the long install; then everything else
# constrained to it, and checked again so no dependency swapped it.
$(GPU_VENV)/.installed-gpu: pyproject.toml requirements/constraints-gpu.txt requirements/no-deps.txt \
  tests/plugins/peftfleet_example_plugin/pyproject.toml
	test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PIP) install --quiet$(TORCH_INDEX) -c requirements/constraints-gpu.txt $(TORCH)
	$(CHECK_TORCH_GPU)
	$(GPU_PIP) install --quiet -c requirements/constraints-gpu.txt -e '.[test]' -e tests/plugins/peftfleet_example_plugin
	$(GPU_PIP) install --quiet --no-deps -r requirements/no-deps.txt
	$(CHECK_TORCH_GPU)
	touch $@

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache
