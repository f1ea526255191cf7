"""The CUDA sources compile: every csrc/cuda/*.cu through nvcc -c, on a machine without a GPU.

With torch's CPU build, setup.py leaves csrc/cuda out of the extension, so nothing else would
notice that a CUDA source stopped compiling. This test compiles each file as a CUDA build of
setup.py would (torch's include paths and NVCC flags, C++17, sm_80 and sm_90) into a temporary
folder, all files in parallel, and fails with nvcc's output on an error, or on a warning in
fastformer's own sources (warnings inside torch's headers are not ours to fix).

cublasLt.h comes from the CUDA toolkit, or from the cuBLAS wheel that `make setup` unpacks into
$VENV/cuda-headers. Skipped when torch has CUDA (its build compiles these files) and, with the
reason, when nvcc or cublasLt.h is missing. Nothing here runs a kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("80", "90")  # Ampere and Hopper: fastformer's targets
HEADERS = Path(sys.prefix) / "cuda-headers"  # where `make setup` puts cublasLt.h
TIMEOUT_S = 600


def _nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    candidates += [
        os.path.join(os.environ[var], "bin", "nvcc")
        for var in ("CUDA_HOME", "CUDA_PATH")
        if os.environ.get(var)
    ]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _nvcc_includes(nvcc: str) -> list[Path]:
    """The include folders nvcc adds by itself, read from a dry run."""
    dry = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r'INCLUDES="([^"]*)"', dry.stdout + dry.stderr)
    return [Path(p) for p in re.findall(r"-I(\S+)", match.group(1))] if match else []


def _cublas_include(nvcc: str) -> list[str] | None:
    """Extra -I flags that make cublasLt.h visible, or None when it is nowhere."""
    if any((d / "cublasLt.h").exists() for d in _nvcc_includes(nvcc)):
        return []
    if (HEADERS / "cublasLt.h").exists():
        return [f"-I{HEADERS}"]
    return None


NVCC = _nvcc()
CUBLAS_INCLUDE = _cublas_include(NVCC) if NVCC else None

pytestmark = [
    pytest.mark.skipif(
        torch.version.cuda is not None,
        reason="torch has CUDA: setup.py compiles csrc/cuda itself",
    ),
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)"),
    pytest.mark.skipif(
        NVCC is not None and CUBLAS_INCLUDE is None,
        reason=f"cublasLt.h not found in nvcc's include folder or {HEADERS}: run `make setup`",
    ),
]


def _command(source: Path, out_dir: Path) -> list[str]:
    torch_includes = cpp_extension.include_paths()
    command = [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(out_dir / f"{source.stem}.o"),
        "-std=c++17",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{CSRC}",
        *(f"-I{p}" for p in torch_includes),
        *(CUBLAS_INCLUDE or []),
    ]
    for arch in ARCHS:
        command += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # torch's CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h, a file its CUDA build generates
    # (it only configures the shared library's export macros); c10 skips it with this define.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in torch_includes):
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return command


def _own_warnings(output: str) -> list[str]:
    """Warnings reported in fastformer's sources (csrc/), and any from ptxas."""
    return [
        line
        for line in output.splitlines()
        if ("warning" in line and str(CSRC) in line) or line.startswith("ptxas warning")
    ]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[Path, Future]:
    """Starts nvcc on every source at once (one job per core); tests wait for their own."""
    out_dir = tmp_path_factory.mktemp("cuda-objects")
    pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    jobs = {
        source: pool.submit(
            subprocess.run,
            _command(source, out_dir),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        for source in SOURCES
    }
    yield jobs
    pool.shutdown(wait=True)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_warnings(compiled, source):
    result = compiled[source].result()
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"nvcc failed on {source.name}:\n{output}", pytrace=False)
    warnings = _own_warnings(output)
    if warnings:
        pytest.fail(f"nvcc warns about {source.name}:\n" + "\n".join(warnings), pytrace=False)


_NM_LINE = re.compile(r"^\s*(?:[0-9a-fA-F]+\s+)?[A-Za-z]\s+(.+)$")


def _symbols(objects: list[Path], *flags: str) -> set[str]:
    listing = subprocess.run(
        ["nm", "-C", *flags, *map(str, objects)], capture_output=True, text=True, check=True
    )
    # Lines "[address] type name"; the names are demangled, so they hold spaces.
    entries = (_NM_LINE.match(line) for line in listing.stdout.splitlines())
    return {entry.group(1) for entry in entries if entry}


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not found")
def test_objects_define_every_fastformer_function_they_call(compiled, tmp_path_factory):
    """A link check without CUDA's libraries: what the CUDA objects call in fastformer's own
    namespace (a launcher declared in a header and never defined, a signature that differs
    between declaration and definition) is defined by one of them."""
    for source in SOURCES:
        if compiled[source].result().returncode != 0:
            pytest.skip(f"{source.name} did not compile (reported by its own test)")
    out_dir = Path(compiled[SOURCES[0]].result().args[4]).parent
    objects = [out_dir / f"{source.stem}.o" for source in SOURCES]
    defined = _symbols(objects, "--defined-only")
    called = {s for s in _symbols(objects, "--undefined-only") if s.startswith("fastformer::")}
    assert called, "the host code calls no launcher in another file: the check checks nothing"
    assert called <= defined, f"called but defined nowhere: {sorted(called - defined)}"
