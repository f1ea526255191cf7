"""Test set-up: run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton.jit runs, so it is set here, before anything
imports fastformer's kernels, unless a GPU is present (then the kernels run natively).
FASTFORMER_POISON_OUTPUTS fills every output buffer with NaN before a kernel writes it,
so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTFORMER_POISON_OUTPUTS", "1")

import pytest

import fastformer
from fastformer import backend

HAS_CUDA = torch.cuda.is_available()
HAS_EXTENSION = fastformer.info()["extension"]["available"]
HAS_INTERPRETER = backend.triton_interpreter_enabled() and backend.triton_available()

requires_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="fastformer._C is not built")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_interpreter = pytest.mark.skipif(
    not HAS_INTERPRETER, reason="needs Triton's interpreter (TRITON_INTERPRET=1 without a GPU)"
)

# (device, implementation) pairs this machine can run. "c++" is the CPU extension;
# "triton" is the Triton kernel, on the GPU or, on CPU, through the interpreter.
IMPLEMENTATIONS: list[tuple[str, str]] = []
if HAS_EXTENSION:
    IMPLEMENTATIONS.append(("cpu", "c++"))
    if HAS_INTERPRETER:
        IMPLEMENTATIONS.append(("cpu", "triton"))
    if HAS_CUDA:
        IMPLEMENTATIONS.append(("cuda", "triton"))

# (dtype, atol) per implementation, following the tolerance rule of DESIGN.md. The
# interpreter mishandles bfloat16, so bfloat16 is checked on the C++ path and on GPUs.
DTYPES = {
    ("cpu", "c++"): [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)],
    ("cpu", "triton"): [(torch.float32, 1e-5), (torch.float16, 1e-3)],
    ("cuda", "triton"): [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)],
}


def implementation_cases() -> list:
    """pytest params of (device, implementation, dtype, atol)."""
    return [
        pytest.param(device, impl, dtype, atol, id=f"{device}-{impl}-{str(dtype)[6:]}")
        for device, impl in IMPLEMENTATIONS
        for dtype, atol in DTYPES[(device, impl)]
    ]


@pytest.fixture
def use_implementation():
    """Returns a function that selects the implementation for the rest of the test."""

    def select(device: str, impl: str) -> None:
        backend.set_triton_on_cpu(device == "cpu" and impl == "triton")

    yield select
    backend.set_triton_on_cpu(False)


@pytest.fixture
def kernels(use_implementation, device, impl):
    """Run the test's implementation (C++ or Triton) for its device (parametrized by
    implementation_cases)."""
    use_implementation(device, impl)
