"""Builds fastformer._C from csrc/ and installs kernels/ as the package fastformer_kernels.

The C++ sources (op schemas, CPU kernels) are always built; the CUDA sources (csrc/cuda/*.cu)
are added when torch was built with CUDA and nvcc is found, and linked with cuBLASLt. Environment:

  FASTFORMER_SKIP_EXTENSION=1   install the Python packages only (the ops that need the
                                extension then say how to build it)
  FASTFORMER_CPU_FLAGS="..."    compiler flags choosing the CPU instruction set
                                (default: AVX2 + FMA on x86-64 machines that have them)
  TORCH_CUDA_ARCH_LIST="..."    CUDA architectures (default: the visible GPU's, else
                                Ampere, Ada and Hopper)
  MAX_JOBS=N                    parallel compile jobs (ninja)
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"
# cuBLASLt in the NVIDIA wheels beside torch's CUDA builds: (folder in site-packages, library).
CUBLASLT_WHEELS = (("nvidia/cu13", "libcublasLt.so.13"), ("nvidia/cublas", "libcublasLt.so.12"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _cpu_flags() -> list[str]:
    """Instruction-set flags for the CPU kernels.

    The build is for the machine it runs on (as `make setup` does everywhere): at::vec picks
    its AVX-512 or AVX2 implementation when CPU_CAPABILITY_AVX512 / _AVX2 is defined, so the
    compiler flags and the macro go together. AVX-512 (16 floats a vector, and Sleef's
    AVX-512 exp) makes the CPU attention about 10% faster than AVX2 on an Intel Xeon;
    machines without AVX2 (or non-x86) get the portable build.
    """
    if "FASTFORMER_CPU_FLAGS" in os.environ:
        return os.environ["FASTFORMER_CPU_FLAGS"].split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    features = set(cpuinfo.split())
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if features >= {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}:
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        return [*avx2, *avx512, "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if features >= {"avx2", "fma", "f16c"}:
        return [*avx2, "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _cublaslt(cuda_home: Path, torch_dir: Path) -> tuple[list[str], list[str]]:
    """Include directories and link arguments for cuBLASLt (csrc/cuda/cublaslt_gemm.cu).

    Preferred: the library torch itself loads, from the NVIDIA wheel beside torch's CUDA build
    (nvidia/cu13 or nvidia/cublas under site-packages). Those wheels ship only versioned names
    (libcublasLt.so.13), so it is linked by file name with an rpath to its folder. Otherwise the
    toolkit's libcublasLt.so in CUDA_HOME. Headers come from CUDA_HOME, else from the wheel.
    """
    has_header = (cuda_home / "include" / "cublasLt.h").exists()
    site_packages = torch_dir.parent
    for package, soname in CUBLASLT_WHEELS:
        root = site_packages / package
        if (root / "lib" / soname).exists():
            lib = str(root / "lib")
            include_dirs = [] if has_header else [str(root / "include")]
            return include_dirs, [f"-L{lib}", f"-l:{soname}", f"-Wl,-rpath,{lib}"]
    for lib in (cuda_home / "lib64", cuda_home / "lib"):
        if (lib / "libcublasLt.so").exists():
            return [], [f"-L{lib}", "-lcublasLt"]
    raise RuntimeError(
        f"fastformer: cuBLASLt not found (no libcublasLt.so in {cuda_home}/lib64, no NVIDIA "
        f"cuBLAS wheel in {site_packages}); install the CUDA toolkit's cuBLAS or set "
        "FASTFORMER_SKIP_EXTENSION=1"
    )


def _extensions() -> tuple[list, dict]:
    if _env_flag("FASTFORMER_SKIP_EXTENSION"):
        print("fastformer: FASTFORMER_SKIP_EXTENSION is set, not building fastformer._C")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DTORCH_EXTENSION_NAME=_C", *_cpu_flags()]
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("cuda/*.cu"))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is not None
        and bool(cuda_sources)
    )
    extension_type = cpp_extension.CppExtension
    extra_compile_args: dict[str, list[str]] = {"cxx": cxx_flags}
    include_dirs = [str(CSRC)]
    link_args = ["-fopenmp"]
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to ask: build for the architectures fastformer targets, Hopper included.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        extension_type = cpp_extension.CUDAExtension
        sources += cuda_sources
        # No --use_fast_math: its tanh/erf/exp approximations would show in float32 results,
        # and the elementwise kernels are bound by memory, not arithmetic.
        extra_compile_args["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        cublas_includes, cublas_link = _cublaslt(
            Path(cpp_extension.CUDA_HOME), Path(torch.__file__).parent
        )
        include_dirs += cublas_includes
        link_args += cublas_link
    extension = extension_type(
        name="fastformer._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_args,
        py_limited_api=False,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(
    packages=[
        "fastformer",
        "fastformer.ops",
        "fastformer.nn",
        "fastformer.models",
        "fastformer.integrations",
        "fastformer_kernels",
        "fastformer_benchmarks",
        "fastformer_benchmarks.results",  # data only: committed results, the default --out
    ],
    package_dir={"fastformer_kernels": "kernels", "fastformer_benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
