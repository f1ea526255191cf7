# The README's commands. Each one sets up what it needs (virtual environment, torch,
# dependencies, the compiled extension) and is safe to rerun: set-up steps are skipped
# when done, and the extension is rebuilt (incrementally) when its sources change.
#
#   make bench   run the kernel benchmarks on this machine's device
#   make test    run the whole test suite
#
# Without an NVIDIA GPU, torch's CPU build is installed (never the multi-GB CUDA build);
# with one, torch's default CUDA build from PyPI.

PYTHON ?= python3
VENV ?= .venv
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
BENCH_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.fastformer-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup bench test lint clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

# torch first, chosen by the machine: the CUDA build where nvidia-smi sees a GPU, else the
# CPU wheel: from pip's configured wheel folder if it holds one (its dependencies then come
# from the usual index), else from PyTorch's CPU index.
$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install "torch>=2.11"; \
	elif $(BIN)/pip install --no-index --no-deps "torch==$(TORCH_CPU_VERSION)+cpu" 2>/dev/null; then \
		$(BIN)/pip install "torch==$(TORCH_CPU_VERSION)+cpu"; \
	else \
		$(BIN)/pip install "torch==$(TORCH_CPU_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	touch $@

# The package itself, built against the torch above (no build isolation: an isolated
# build would pull torch's newest CUDA build to compile against).
$(STAMP): $(VENV)/.torch $(SOURCES)
	$(BIN)/pip install setuptools wheel ninja pybind11
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/pip install --no-build-isolation -e ".[dev]"
	touch $@

bench: setup
	$(BIN)/fastformer bench $(BENCH_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build *.egg-info fastformer/_C*.so
