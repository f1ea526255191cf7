"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, and check the result.

    python tools/cross_compile.py                       # the CI set, sm_90 (Hopper)
    python tools/cross_compile.py --set full --arch 90 80 --csv compile.csv

Triton's interpreter (how CPU CI runs the kernels) never lowers them: a kernel it runs may
still fail to compile for a GPU, need more shared memory than one has, or spill registers.
This tool runs the real compiler (Triton -> PTX -> ptxas -> cubin) for a chosen GPU
architecture, with no GPU and no CUDA driver: a stand-in Triton driver names the target,
and the kernels' own launchers are called on CPU tensors with every launch turned into a
compile-only warm-up. Each autotuned launch compiles the tile configurations the
autotuner would time for that call (after its pruning): all of them in the "full" set, the
first (largest, so the most demanding of registers and shared memory) in the "ci" set.

Checked for each compiled kernel: it compiles; its shared memory fits the architecture's
per-block limit (a tile that does not is skipped by the autotuner at run time, so every
launch needs at least one that does: else the call would fail on that GPU). Reported:
registers per thread and spilled bytes (from ptxas -v), shared memory, compile time.
Exit status 1 when a check fails.

The cases (--set): "ci" covers each kernel's code paths once (bf16 head dims 40, 64, 128,
256; masks, flash_attn_func's in-kernel ALiBi and softcap, causal, dropout, the
half-precision residual; fp16; fp32's IEEE products) at a long sequence, where every tile
is a candidate, and a decoding step (the split forward);
"full" crosses bf16 with every supported head dim and variant (windows too), a value head
dim that differs and decoding (L = 1), and adds fp16 at every head dim and fp32 at 64, 128
and 256.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Before Triton is imported: a cache of this run's own (so that ptxas runs and reports for
# every kernel), ptxas's resource report printed into the log this tool reads, and no
# interpreter (it would replace the compiler).
_CACHE_DIR = tempfile.mkdtemp(prefix="fastformer-cross-compile-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR
os.environ["PTXAS_OPTIONS"] = "-v"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory one block may use (the opt-in maximum), by compute capability.
SHARED_LIMIT_BYTES = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


class CrossCompileDriver(DriverBase):
    """A Triton driver that only names a target: enough to compile, never to launch."""

    def __init__(self, capability: int) -> None:
        super().__init__()
        self.target = GPUTarget("cuda", capability, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("cross-compilation launches nothing")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("cross-compilation times nothing")

    def get_current_device(self) -> int:
        # Triton caches a kernel's compiler per device: one device number per target keeps
        # the targets of one run apart.
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass
class Compiled:
    case: str
    kernel: str
    config: dict
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    mma: str  # "wgmma" (Hopper's warpgroup MMA), "mma" (mma.sync) or "" (no tensor cores)
    seconds: float


@dataclass
class Launch:
    """One launch of a kernel: the configurations compiled for it."""

    case: str
    kernel: str
    compiled: list[Compiled] = field(default_factory=list)


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_resources(log: str) -> tuple[int | None, int | None]:
    """Registers per thread and spilled bytes (stores + loads) from ptxas -v's report."""
    registers = _PTXAS_REGISTERS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    return (
        int(registers.group(1)) if registers else None,
        int(spills.group(1)) + int(spills.group(2)) if spills else None,
    )


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else ""


class Recorder:
    """Turns launches into compile-only warm-ups and records what each compiled."""

    def __init__(self, every_config: bool) -> None:
        self.case = ""
        self.launches: list[Launch] = []
        self.every_config = every_config
        # (registers, spilled bytes) by compiled kernel: Triton reuses a kernel compiled for
        # an earlier case of the same specialization (head dims 96 and 128 pad alike), and
        # ptxas reports only when it runs.
        self.resources: dict[int, tuple[int | None, int | None]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        jit_run, autotuner_run = JITFunction.run, Autotuner.run
        recorder = self

        def compile_only(fn: JITFunction, *args, grid, warmup, **kwargs):
            del warmup  # always a warm-up: compile, never launch
            log = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(log):
                kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            seconds = time.perf_counter() - start
            config = {
                k: kwargs[k]
                for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
                if k in kwargs
            }
            if id(kernel) not in recorder.resources:  # compiled now, not reused
                recorder.resources[id(kernel)] = _ptxas_resources(log.getvalue())
            registers, spill_bytes = recorder.resources[id(kernel)]
            compiled = Compiled(
                recorder.case,
                fn.__name__,
                config,
                kernel.metadata.shared,
                registers,
                spill_bytes,
                _mma_kind(kernel.asm["ptx"]),
                seconds,
            )
            launch = recorder.launches[-1] if recorder.launches else None
            if launch is None or launch.kernel != fn.__name__ or launch.case != recorder.case:
                launch = Launch(recorder.case, fn.__name__)
                recorder.launches.append(launch)
            launch.compiled.append(compiled)
            return kernel

        def compile_tiles(tuner: Autotuner, *args, **kwargs):
            # The configurations the autotuner would time for this call, each compiled.
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            configs = tuner.prune_configs(kwargs)
            if not recorder.every_config:
                configs = configs[:1]  # the largest tile: the most registers and shared memory
            recorder.launches.append(Launch(recorder.case, tuner.base_fn.__name__))
            for config in configs:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        JITFunction.run, Autotuner.run = compile_only, compile_tiles
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = jit_run, autotuner_run


# ----------------------------------------------------------------------------------------
# Cases: the kernels' launchers on CPU tensors of the shapes and flags to compile for
# ----------------------------------------------------------------------------------------


def _attention_case(
    dtype: torch.dtype, head_dim: int, value_dim: int, length: int, source: int, variant: str
) -> Callable[[], None]:
    from fastformer_kernels.attention import attention_forward
    from fastformer_kernels.attention_backward import attention_backward

    def run() -> None:
        q = torch.empty(1, 2, length, head_dim, dtype=dtype)
        k = torch.empty(1, 1, source, head_dim, dtype=dtype)
        v = torch.empty(1, 1, source, value_dim, dtype=dtype)
        mask = slopes = None
        if variant == "float mask":
            mask = torch.empty(1, 1, 1, source, dtype=dtype).expand(1, 2, length, source)
        elif variant == "bool mask":
            mask = torch.empty(1, 1, length, source, dtype=torch.bool).expand(1, 2, length, source)
        elif variant == "alibi":  # flash_attn_func's ALiBi: float32 slopes per head, causal
            slopes = torch.empty(2, dtype=torch.float32).expand(1, 2)
        dropout_p = 0.1 if variant == "dropout" else 0.0
        softcap = 50.0 if variant == "softcap" else 0.0  # Gemma 2's, causal
        seed = torch.zeros(1, dtype=torch.int64)
        left, right = {
            "causal": (-1, 0),
            "window": (128, 0),
            "alibi": (-1, 0),
            "softcap": (-1, 0),
        }.get(variant, (-1, -1))
        # The ops' arguments after q, k, v (after grad_lse in the backward's).
        options = (mask, slopes, seed, head_dim**-0.5, softcap, dropout_p, source - length)
        options += (left, right)
        forward = attention_forward(q, k, v, *options, True)
        grad_out = torch.empty_like(forward.out)
        attention_backward(
            grad_out, q, k, v, forward.out, forward.stats, None, *options, forward.out_residual
        )

    return run


def _layer_norm_case(
    dtype: torch.dtype, hidden: int, rms: bool, dropout: bool
) -> Callable[[], None]:
    from fastformer_kernels.layer_norm_residual import (
        layer_norm_residual_backward,
        layer_norm_residual_forward,
    )

    def run() -> None:
        x = torch.empty(64, hidden, dtype=dtype)
        weight, bias = torch.empty(hidden, dtype=dtype), torch.empty(hidden, dtype=dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        dropout_p = 0.1 if dropout else 0.0
        bias_arg = None if rms else bias
        fwd = layer_norm_residual_forward(
            x, x, weight, bias_arg, seed, 1e-5, dropout_p, rms, torch.float32, True
        )
        layer_norm_residual_backward(
            x,
            fwd.h,
            fwd.h,
            weight,
            fwd.mean,
            fwd.rstd,
            seed,
            dropout_p,
            rms,
            not rms,
            dtype,
            dtype,
            True,
        )

    return run


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cases(which: str) -> dict[str, Callable[[], None]]:
    """Name -> a call of the launchers that compiles one variant."""
    found: dict[str, Callable[[], None]] = {}

    def attention(
        dtype_name: str, d: int, variant: str, dv: int | None = None, length: int = 4096
    ) -> None:
        name = (
            f"attention {dtype_name} d{d}"
            + (f" dv{dv}" if dv else "")
            + (f" L{length} S4096" if length != 4096 else " L4096")
            + f" {variant}"
        )
        found[name] = _attention_case(_DTYPES[dtype_name], d, dv or d, length, 4096, variant)

    def layer_norm(dtype_name: str, hidden: int, rms: bool, dropout: bool) -> None:
        name = f"layer_norm_residual {dtype_name} N{hidden} {'rms' if rms else 'layer'}"
        found[name + (" dropout" if dropout else "")] = _layer_norm_case(
            _DTYPES[dtype_name], hidden, rms, dropout
        )

    if which == "ci":
        # Each kernel's code paths once (bf16 shares every one with fp16 but the dtype), the
        # head dims that pick different tiles, a padded one, and fp32's IEEE dot products.
        for d in (40, 64, 128, 256):
            attention("bf16", d, "plain")
        for variant in ("causal", "float mask", "bool mask", "dropout", "alibi", "softcap"):
            attention("bf16", 128, variant)
        attention("fp16", 128, "plain")
        attention("bf16", 128, "causal", length=1)  # decoding: the split forward and its combine
        attention("fp32", 64, "plain")
        attention("fp32", 64, "causal")
        for dtype_name in ("bf16", "fp32"):
            layer_norm(dtype_name, 1000, False, False)
            layer_norm(dtype_name, 65536, True, True)
        return found
    # bf16 in full; fp16 differs from it only by the dtype, so its plain variant per head
    # dim; fp32 (IEEE products on the FMA units) at the common head dims.
    variants = (
        "plain",
        "causal",
        "float mask",
        "bool mask",
        "dropout",
        "window",
        "alibi",
        "softcap",
    )
    for d in (16, 32, 40, 64, 80, 96, 112, 128, 160, 192, 256):
        for variant in variants if d in (40, 64, 128, 256) else ("plain", "causal"):
            attention("bf16", d, variant)
        attention("fp16", d, "plain")
    attention("bf16", 128, "plain", dv=64)
    for d in (64, 128, 256):
        attention("bf16", d, "causal", length=1)
        for variant in ("plain", "causal", "dropout"):
            attention("fp32", d, variant)
    for dtype_name in _DTYPES:
        for hidden in (512, 1000, 4096, 8192, 16384, 65536):
            for rms, dropout in ((False, False), (True, True)):
                layer_norm(dtype_name, hidden, rms, dropout)
    return found


# ----------------------------------------------------------------------------------------


def check(launches: list[Launch], capability: int) -> list[str]:
    """Launches that no configuration of could run on this architecture."""
    limit = SHARED_LIMIT_BYTES[capability]
    return [
        f"{launch.case}: {launch.kernel}: every configuration needs more than {limit} "
        f"bytes of shared memory ({[c.shared_bytes for c in launch.compiled]})"
        for launch in launches
        if launch.compiled and all(c.shared_bytes > limit for c in launch.compiled)
    ]


CSV_COLUMNS = (
    "arch",
    "triton",
    "case",
    "kernel",
    "BLOCK_M",
    "BLOCK_N",
    "num_warps",
    "num_stages",
    "shared_bytes",
    "registers",
    "spill_bytes",
    "mma",
)


def write_csv(path: Path, report: dict[str, list[dict]], triton_version: str) -> None:
    """One row per compiled kernel (compile times left out: they vary from run to run)."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for arch, compiled in report.items():
            for entry in compiled:
                writer.writerow(
                    {"arch": arch, "triton": triton_version, **entry, **entry["config"]}
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=("ci", "full"), default="ci")
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[90],
        choices=sorted(SHARED_LIMIT_BYTES),
        help="compute capabilities",
    )
    parser.add_argument(
        "-k", action="append", default=[], help="only cases whose name contains this (repeatable)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    parser.add_argument("--json", type=Path, help="write every compiled kernel's figures here")
    parser.add_argument("--csv", type=Path, help="the same as a table, one row a kernel")
    args = parser.parse_args(argv)

    selected = {
        name: run for name, run in cases(args.set).items() if all(k in name for k in args.k)
    }
    failures: list[str] = []
    report: dict[str, list[dict]] = {}
    for capability in args.arch:
        driver.set_active(CrossCompileDriver(capability))
        recorder = Recorder(every_config=args.set == "full")
        start = time.perf_counter()
        with recorder.installed():
            for index, (name, run) in enumerate(selected.items()):
                recorder.case = name
                case_start = time.perf_counter()
                try:
                    run()
                except Exception as error:
                    failures.append(
                        f"sm_{capability}: {name}: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[-1][:300]}"
                    )
                if args.verbose:
                    kernels = sum(len(x.compiled) for x in recorder.launches if x.case == name)
                    print(
                        f"[{index + 1}/{len(selected)}] sm_{capability} {name}: {kernels} "
                        f"kernels, {time.perf_counter() - case_start:.0f} s",
                        flush=True,
                    )
        compiled = [c for launch in recorder.launches for c in launch.compiled]
        failures += [f"sm_{capability}: {f}" for f in check(recorder.launches, capability)]
        limit = SHARED_LIMIT_BYTES[capability]
        over = [c for c in compiled if c.shared_bytes > limit]
        spilling = [c for c in compiled if c.spill_bytes]
        print(
            f"sm_{capability}: {len(selected)} cases, {len(compiled)} kernels compiled in "
            f"{time.perf_counter() - start:.0f} s; {len(over)} over the shared memory limit "
            f"({limit} bytes, skipped by the autotuner), {len(spilling)} spilling registers"
        )
        for c in spilling:
            print(
                f"  spills {c.spill_bytes} B: {c.case}: {c.kernel} {c.config} "
                f"({c.registers} registers)"
            )
        for c in over:
            print(f"  shared {c.shared_bytes} B: {c.case}: {c.kernel} {c.config}")
        report[f"sm_{capability}"] = [asdict(c) for c in compiled]
    if args.json:
        args.json.write_text(
            json.dumps({"triton": triton.__version__, "set": args.set, "results": report}, indent=1)
        )
    if args.csv:
        write_csv(args.csv, report, triton.__version__)
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
