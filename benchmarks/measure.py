"""Measurement for the benchmark harness: timing (interleaved rounds on CPU, do_bench on GPU),
peak and activation memory, and the device's peaks (copy bandwidth, matmul rate).

Rules (DESIGN.md, Benchmarks): every ratio is measured side by side in one process, on CPU
with the providers of a case interleaved round by round, so a slow drift (thermal, a
neighbour) hits all of them alike; medians of many repeats after a warm-up that also
absorbs compilation, which is never timed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# CPU timing: each sample lasts at least MIN_SAMPLE_S (fast calls are batched), and a case
# stops after MAX_REPEATS rounds or once its budget is spent with MIN_REPEATS rounds done.
MIN_SAMPLE_S = 1e-3
MIN_REPEATS = 5
MAX_REPEATS = 50
WARMUP_S = 0.2
# GPU timing: triton.testing.do_bench's warm-up and measuring windows, in ms. do_bench
# flushes the L2 cache before every call, so a single input set is honest there.
GPU_WARMUP_MS = 25
GPU_REP_MS = 200


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int | None  # timed samples (None: do_bench does not report its count)
    method: str  # how it was measured, for the record


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_timing(fn: Callable[[], Any]) -> Timing:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(
        fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, quantiles=[0.5, 0.2, 0.8]
    )
    return Timing(median, p20, p80, None, f"triton.testing.do_bench(rep={GPU_REP_MS} ms)")


def measure_side_by_side(
    fns: dict[str, Callable[[], Any]], *, device: torch.device, budget_s: float = 2.0
) -> dict[str, Timing]:
    """Time several callables of one case. CPU: interleaved rounds, one sample of each per
    round in a rotating order, until MAX_REPEATS rounds or `budget_s` per callable (with at
    least MIN_REPEATS rounds). GPU: do_bench for each in turn (it flushes L2 per call)."""
    if device.type == "cuda":
        return {name: _gpu_timing(fn) for name, fn in fns.items()}
    names = list(fns)
    if not names:
        return {}
    inner: dict[str, int] = {}
    for name in names:  # warm-up, which also tells how many calls make one sample
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < WARMUP_S:
            fns[name]()
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        inner[name] = max(1, math.ceil(MIN_SAMPLE_S / per_call))
    samples: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + budget_s * len(names)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would be charged to one provider only
    try:
        for round_index in itertools.count():
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                fn, calls = fns[name], inner[name]
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - start) * 1e3 / calls)
            done = round_index + 1
            if done >= MAX_REPEATS or (done >= MIN_REPEATS and time.perf_counter() > deadline):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: timing_of_samples(
            values, f"time.perf_counter, interleaved rounds, {inner[name]} call(s) per sample"
        )
        for name, values in samples.items()
    }


def timing_of_samples(samples_ms: Sequence[float], method: str) -> Timing:
    """Median, p20 and p80 of timed samples (ms)."""
    values = sorted(samples_ms)
    return Timing(
        _quantile(values, 0.5), _quantile(values, 0.2), _quantile(values, 0.8), len(values), method
    )


def measure(fn: Callable[[], Any], *, device: torch.device, budget_s: float = 2.0) -> Timing:
    """Median, p20 and p80 of one callable, in ms (see measure_side_by_side)."""
    return measure_side_by_side({"fn": fn}, device=device, budget_s=budget_s)["fn"]


def _proc_status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1)) * 1024


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Growth of the process's peak resident memory during one call (Linux).

    Resident memory, not torch's allocator statistics: kernels may allocate outside the
    profiled CPU allocator (fastformer's C++ kernels use a huge-page allocator), and only
    the process's memory sees every allocator alike. Memory kept from earlier calls is
    first returned to the system (malloc_trim, and fastformer's cache of freed CPU output
    blocks), so it cannot hide a call's needs; the peak is then reset (clear_refs) and read
    back (VmHWM)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere the figure may read low
    with contextlib.suppress(ImportError, RuntimeError):
        import fastformer

        fastformer.empty_cpu_cache()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _proc_status_bytes("VmRSS")
    result = fn()
    del result
    return _proc_status_bytes("VmHWM") - before


def peak_memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before"
    return (
        "growth of the process's peak resident memory (VmHWM) during one call, after "
        "malloc_trim and fastformer.empty_cpu_cache()"
    )


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes one call needs above what was allocated before it: the inputs exist
    already, its outputs and temporaries count (see peak_memory_method). None where it
    cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - baseline
    try:
        return _cpu_peak_bytes(fn)
    except OSError:  # no /proc (not Linux) or clear_refs not permitted
        return None


def activation_memory(fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward of one call of `fn` (a forward whose inputs
    require grad): the distinct storages it saves, except those of `inputs` (the input and
    parameters, which exist anyway) and of the output. This is the activation memory a
    model holds per layer until its backward. Counted through saved_tensors_hooks, the same
    on every device and allocator (resident memory cannot tell a forward's tensors from
    freed memory it reuses); memory an op keeps outside autograd's saved tensors is not
    seen."""
    saved: dict[int, int] = {}  # storage address -> bytes

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    for tensor in (*inputs, out):
        saved.pop(tensor.untyped_storage().data_ptr(), None)
    return sum(saved.values())


# ----------------------------------------------------------------------------- device peaks


@dataclass
class DevicePeaks:
    copy_gbps: float  # dst.copy_(src): (read + write bytes) / median time
    copy_bytes: int  # size of the copied tensor
    matmul_tflops: dict[str, float]  # dtype -> 2*n^3 / median time of an n x n matmul
    matmul_n: int
    notes: str


_PEAKS: dict[str, DevicePeaks] = {}


def device_peaks(device: torch.device, dtype: torch.dtype | None = None) -> DevicePeaks:
    """Copy bandwidth and matmul rate of this device, measured once per process: the matmul
    rate in bfloat16, float16 and float32 on a GPU, float32 on CPU, and in `dtype` (the
    run's chosen dtype) too."""
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    if device.type != "cuda":
        dtypes = [torch.float32]
    if dtype is not None and dtype not in dtypes:
        dtypes.append(dtype)
    key = f"{device} {dtypes}"
    if key not in _PEAKS:
        _PEAKS[key] = _measure_peaks(device, dtypes)
    return _PEAKS[key]


def _measure_peaks(device: torch.device, dtypes: Sequence[torch.dtype]) -> DevicePeaks:
    gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if gpu else (256 << 20)
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device=device, budget_s=1.0)
    n = 8192 if gpu else 2048
    tflops = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timing = measure(lambda a=a, b=b: a @ b, device=device, budget_s=1.0)
        tflops[dtype_name(dtype)] = 2 * n**3 / (timing.p20_ms * 1e-3) / 1e12
    # A peak is the fast end of its distribution (the 20th-percentile time): a shared
    # machine's noise then cannot lower it, and shares of it stay conservative.
    notes = "copy: one tensor copy, read + write bytes counted; peaks at p20 time"
    if gpu:
        notes += f"; float32 matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
    return DevicePeaks(2 * copy_bytes / (copy.p20_ms * 1e-3) / 1e9, copy_bytes, tflops, n, notes)


# ----------------------------------------------------------------------------- dtypes

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(DTYPES)}") from None
