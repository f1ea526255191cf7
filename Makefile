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
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)
# cuBLAS headers for the CUDA compile check (tests/test_cuda_sources.py), from this wheel.
CUBLAS_WHEEL ?= nvidia-cublas==13.1.0.3
CUDA_HEADERS := $(VENV)/cuda-headers

.PHONY: setup bench test lint clean

setup: $(STAMP) $(CUDA_HEADERS)/.fetched

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

# On a machine with nvcc but torch's CPU build (CI), setup.py does not compile csrc/cuda; the
# test compiles each .cu file with nvcc instead, which needs cublasLt.h. The toolkit here may lack
# cuBLAS, so its headers come from NVIDIA's cuBLAS wheel: downloaded to a temporary folder, only
# nvidia/cu13/include/* kept (under 1 MB). Skipped without nvcc, with a CUDA torch, or when the
# toolkit has the header; a failed download only warns (the test then skips, saying why).
define EXTRACT_CUDA_HEADERS
import pathlib, sys, zipfile
wheel_dir, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
prefix = "nvidia/cu13/include/"
with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as wheel:
    names = [n for n in wheel.namelist() if n.startswith(prefix) and not n.endswith("/")]
    assert names, f"no {prefix} in the wheel"
    for name in names:
        path = out / name[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(wheel.read(name))
endef
export EXTRACT_CUDA_HEADERS

$(CUDA_HEADERS)/.fetched: | $(VENV)/.torch
	@if ! command -v nvcc >/dev/null 2>&1; then \
		echo "no nvcc: the CUDA compile check will be skipped"; \
	elif $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		echo "torch has CUDA: setup.py compiles csrc/cuda itself"; \
	elif [ -f "$${CUDA_HOME:-/usr/local/cuda}/include/cublasLt.h" ]; then \
		echo "cublasLt.h found in $${CUDA_HOME:-/usr/local/cuda}/include"; \
	else \
		tmp=$$(mktemp -d); \
		if $(BIN)/pip download --quiet --no-deps "$(CUBLAS_WHEEL)" -d "$$tmp" && \
			$(BIN)/python -c "$$EXTRACT_CUDA_HEADERS" "$$tmp" "$(CUDA_HEADERS)"; then \
			touch $@; echo "cuBLAS headers in $(CUDA_HEADERS)"; \
		else \
			echo "warning: could not fetch $(CUBLAS_WHEEL); the CUDA compile check will be skipped"; \
		fi; \
		rm -rf "$$tmp"; \
	fi

bench: setup
	$(BIN)/fastformer bench $(BENCH_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf build *.egg-info fastformer/_C*.so
