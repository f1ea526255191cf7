"""Robustness: what a long training run and a CI farm need beyond correct numbers.

4. Forward + backward is bitwise reproducible, with torch.use_deterministic_algorithms and
   without (fastformer's kernels are deterministic: no atomics).
5. Memory does not grow over repeated calls (process RSS and the CPU output cache; CUDA
   memory_allocated).
6. Calls from several Python threads give the results of the same calls run serially.
7. An impossible allocation raises torch's out-of-memory error, and the next call works.
8. Offsets are 64-bit: tensors over 2^31 elements (FASTFORMER_TEST_LARGE=1) and attention
   with batch * heads > 65535.

Implementations: see tests/hardening.py.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

import fastformer
from fastformer import reference
from tests.conftest import requires_cuda, requires_extension
from tests.hardening import (
    CPU,
    CUDA,
    FEED_FORWARD_IMPLS,
    FP32_ATOL,
    KERNEL_IMPLS,
    MIB,
    Step,
    assert_all_like_reference,
    attention_inputs,
    attention_triple,
    feed_forward_triple,
    float64,
    generator,
    layer_norm_triple,
    randn,
    requires_interpreter,
)
from tests.test_attention import _grads as attention_results
from tests.test_feed_forward import _CUDA_READY as FEED_FORWARD_CUDA_READY
from tests.test_feed_forward import _inputs as feed_forward_inputs
from tests.test_feed_forward import _run as feed_forward_results
from tests.test_layer_norm_residual import Flags
from tests.test_layer_norm_residual import _inputs as layer_norm_inputs
from tests.test_layer_norm_residual import _run as layer_norm_results
from tests.tolerance import assert_close_to_reference

pytestmark = [
    # Nearly every test runs layer_norm_residual or feed_forward, which need fastformer._C.
    requires_extension,
    # NaN, Inf and overflow are these tests' inputs: numpy warns about them inside the
    # interpreter, which computes with numpy.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


# ----------------------------------------------------------------------------------------
# Forward + backward steps shared by the determinism, memory and thread tests
# ----------------------------------------------------------------------------------------


def _leaves(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def attention_step(
    device: str, shape=(1, 2, 19, 23, 16), *, dropout_p: float = 0.0, causal: bool = False
) -> Step:
    tensors = attention_inputs(device, shape=shape, seed=sum(shape))
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    grad_out = randn(*q.shape, device=device, seed=1)

    def step() -> list[Tensor]:
        leaves = _leaves(q, k, v)
        out = fastformer.scaled_dot_product_attention(
            *leaves, dropout_p=dropout_p, is_causal=causal
        )
        out.backward(grad_out)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    return step


def layer_norm_step(device: str, shape=(33, 40), *, dropout_p: float = 0.0) -> Step:
    tensors = layer_norm_inputs(shape, torch.float32, device, Flags(), seed=sum(shape))
    grad_out = randn(*shape, device=device, seed=2)
    grad_h = randn(*shape, device=device, seed=3)

    def step() -> list[Tensor]:
        leaves = _leaves(*tensors.values())
        out, h = fastformer.layer_norm_residual(*leaves, dropout_p=dropout_p)
        torch.autograd.backward([out, h], [grad_out, grad_h])
        return [out.detach(), h.detach(), *(leaf.grad for leaf in leaves)]

    return step


def feed_forward_step(
    device: str, shape=(37, 24, 40, 19), *, activation: str = "gelu", dropout_p: float = 0.0
) -> Step:
    tokens, d_model, hidden, d_out = shape
    tensors = feed_forward_inputs(
        (tokens,), d_model, hidden, d_out, activation, torch.float32, device, seed=sum(shape)
    )
    grad_out = randn(tokens, d_out, device=device, seed=4)

    def step() -> list[Tensor]:
        leaves = _leaves(*tensors.values())
        out = fastformer.feed_forward(*leaves, activation=activation, dropout_p=dropout_p)
        out.backward(grad_out)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    return step


def encoder_layer_step(device: str, shape=(2, 9, 32), *, dropout_p: float = 0.1) -> Step:
    """fastformer.nn.TransformerEncoderLayer in training mode: attention (head dim 16),
    feed-forward and two fused residual + LayerNorms, with dropout in each."""
    d_model = shape[-1]  # shape: (batch, length, d_model)
    torch.manual_seed(20)
    layer = fastformer.nn.TransformerEncoderLayer(
        d_model, 2, 2 * d_model, dropout=dropout_p, batch_first=True, device=device
    )
    x = randn(*shape, device=device, seed=21)

    def step() -> list[Tensor]:
        layer.zero_grad(set_to_none=True)
        (leaf,) = _leaves(x)
        out = layer(leaf)
        out.square().sum().backward()
        return [out.detach(), leaf.grad, *(p.grad for p in layer.parameters())]

    return step


STEPS: dict[str, Callable[..., Step]] = {
    "attention": attention_step,
    "layer_norm_residual": layer_norm_step,
    "feed_forward": feed_forward_step,
    "encoder_layer": encoder_layer_step,
}


def _assert_equal_results(first: list[Tensor], second: list[Tensor], what: str) -> None:
    assert len(first) == len(second)
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype
        differing = (a != b).sum().item()
        assert torch.equal(a, b), f"{what}: result {index} differs in {differing} elements"


# ----------------------------------------------------------------------------------------
# 4. Determinism
# ----------------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["deterministic-algorithms", "default"])
def deterministic_flag(request) -> Iterator[bool]:
    """torch.use_deterministic_algorithms(param) for the test, restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _op_impls(op: str) -> list:
    """feed_forward has no Triton kernel: its implementations are the C++ / CUDA ones."""
    return FEED_FORWARD_IMPLS if op == "feed_forward" else KERNEL_IMPLS


DETERMINISM_CASES = [
    pytest.param(op, *impl.values, id=f"{op}-{impl.id}", marks=impl.marks)
    for op in STEPS
    for impl in _op_impls(op)
]


@pytest.mark.parametrize("op, device, impl", DETERMINISM_CASES)
def test_forward_backward_is_bitwise_reproducible(
    use_implementation, deterministic_flag, op, device, impl
):
    """Two runs from the same torch.manual_seed, dropout included, agree bit for bit."""
    use_implementation(device, impl)
    step = STEPS[op](device, dropout_p=0.2)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(step())
    _assert_equal_results(runs[0], runs[1], f"{op} run twice")


# ----------------------------------------------------------------------------------------
# 5. Memory does not grow over repeated calls
# ----------------------------------------------------------------------------------------

WARMUP_CALLS, REPEATED_CALLS = 3, 30
# glibc may keep some freed memory in its arenas even after malloc_trim.
RSS_SLACK = 16 * MIB
# Shapes whose C++ outputs are large enough (2 MiB and more) to come from the CPU output cache.
MEMORY_SHAPES: dict[str, tuple[int, ...]] = {
    "attention": (2, 4, 128, 128, 64),
    "layer_norm_residual": (512, 1024),
    "feed_forward": (256, 256, 2048, 256),
    "encoder_layer": (2, 32, 64),
}


def _resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _release_freed_memory() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _call_repeatedly(step: Step, calls: int) -> None:
    for _ in range(calls):
        step()  # results dropped at once: nothing survives an iteration


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
@pytest.mark.parametrize("op", STEPS)
def test_cpu_memory_does_not_grow(op):
    step = STEPS[op]("cpu", MEMORY_SHAPES[op])
    _call_repeatedly(step, WARMUP_CALLS)
    _release_freed_memory()
    rss_before = _resident_bytes()
    cache_before = fastformer.info()["cpu_output_cache"]
    _call_repeatedly(step, REPEATED_CALLS)
    _release_freed_memory()
    grown = _resident_bytes() - rss_before
    cache_after = fastformer.info()["cpu_output_cache"]
    assert grown <= RSS_SLACK, f"resident memory grew by {grown / MIB:.1f} MiB"
    # Every output block of the loop came from the cache the warm-up filled: no fresh
    # mappings, and the cache holds no more than before.
    assert cache_after["fresh_allocations"] == cache_before["fresh_allocations"]
    assert cache_after["cached_mib"] <= cache_before["cached_mib"]
    assert cache_after["cached_mib"] <= cache_after["limit_mib"]


@requires_cuda
@pytest.mark.parametrize("op", STEPS)
def test_cuda_memory_returns_to_its_baseline(op):
    if op == "feed_forward" and not FEED_FORWARD_CUDA_READY:
        pytest.skip("needs the CUDA feed-forward kernels")
    step = STEPS[op]("cuda", MEMORY_SHAPES[op])
    _call_repeatedly(step, WARMUP_CALLS)  # autotuning and caches settle here
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    _call_repeatedly(step, REPEATED_CALLS)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


# ----------------------------------------------------------------------------------------
# 6. Thread safety
# ----------------------------------------------------------------------------------------

# Several shapes per op, so that calls of different sizes (different CPU cache block sizes,
# different autotuning keys on a GPU) overlap. No dropout: each dropout call draws its seed
# from torch's global generator, in whichever order the threads reach it.
THREAD_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "attention": [(2, 4, 33, 47, 32), (1, 2, 100, 60, 64), (3, 1, 7, 129, 16)],
    "layer_norm_residual": [(600, 1024), (33, 1500), (1024, 257)],
    "feed_forward": [(64, 96, 384, 96), (600, 64, 1024, 48), (7, 33, 65, 33)],
}


def _run_concurrently(steps: list[Step], threads: int) -> list[list[Tensor]]:
    """The steps on a pool of threads. Python switches threads every 5 ms by default; a
    100x shorter interval makes them interleave inside every launch, not just now and then."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(interval / 100)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(lambda step: step(), steps))
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("device, impl", [CPU, CUDA])
def test_concurrent_calls_match_serial_calls(use_implementation, device, impl):
    """4 threads x 18 calls of every op: forward and backward, same results as serially."""
    use_implementation(device, impl)
    if device == "cuda" and not FEED_FORWARD_CUDA_READY:
        pytest.skip("needs the CUDA feed-forward kernels")
    steps = [STEPS[op](device, shape) for op, shapes in THREAD_SHAPES.items() for shape in shapes]
    steps = steps * 2
    serial = [step() for step in steps]
    concurrent_results = _run_concurrently(steps, threads=4)
    for index, (alone, together) in enumerate(zip(serial, concurrent_results, strict=True)):
        _assert_equal_results(alone, together, f"call {index} in a thread")


@requires_interpreter
def test_interpreter_concurrent_calls_match_serial_calls(use_implementation):
    use_implementation("cpu", "triton")
    steps = [attention_step("cpu"), layer_norm_step("cpu")] * 3
    serial = [step() for step in steps]
    concurrent_results = _run_concurrently(steps, threads=2)
    for index, (alone, together) in enumerate(zip(serial, concurrent_results, strict=True)):
        _assert_equal_results(alone, together, f"call {index} in a thread")


_LOCKED_LAUNCHES = """
import threading, time
from fastformer_kernels import _common, attention, attention_backward, layer_norm_residual
assert hasattr(attention.attention_forward, "__wrapped__")
assert hasattr(attention_backward.attention_backward, "__wrapped__")
assert not hasattr(layer_norm_residual.layer_norm_residual_forward, "__wrapped__")
inside = most = 0

@_common.serialized
def launch():
    global inside, most
    inside += 1
    most = max(most, inside)
    time.sleep(0.01)
    inside -= 1

threads = [threading.Thread(target=launch) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(most)
"""


def test_autotuned_launchers_run_one_thread_at_a_time_when_compiled():
    """Triton's Autotuner keeps each call's arguments on the shared kernel object (and resets
    them to None when a call ends), so compiled (GPU) launches of the autotuned attention
    kernels take a lock: 8 threads inside such a launcher run one at a time. The plain
    LayerNorm kernels' launchers take none. Without the interpreter, as on a GPU."""
    result = subprocess.run(
        [sys.executable, "-c", _LOCKED_LAUNCHES],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


# ----------------------------------------------------------------------------------------
# 7. Out of memory
# ----------------------------------------------------------------------------------------

# 2^50 bytes: more than a 48-bit address space (or RAM + swap, which Linux's heuristic
# overcommit checks) can give, yet no overflow anywhere in int64 sizes.
IMPOSSIBLE_BYTES = 2**50
OOM_MESSAGE = r"(?i)out of (cpu )?memory|can't allocate|cannot allocate|not enough memory"
# The size asked for, as the CPU allocators (bytes) and CUDA's (TiB) word it.
OOM_SIZE = rf"{IMPOSSIBLE_BYTES} bytes|1024\.00 TiB"
requires_overcommit_checks = pytest.mark.skipif(
    Path("/proc/sys/vm/overcommit_memory").exists()
    and Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
    reason="vm.overcommit_memory=1 might grant the impossible allocation lazily",
)


def assert_raises_out_of_memory(call: Callable[[], object]) -> None:
    """torch's out-of-memory error (a RuntimeError; torch.OutOfMemoryError from
    fastformer's and CUDA's allocators), saying what failed and how much was asked for."""
    with pytest.raises(RuntimeError, match=OOM_MESSAGE) as error:
        call()
    assert re.search(OOM_SIZE, str(error.value)), f"the size is missing: {error.value}"


def _expanded(rows: int, features: int, device: str) -> Tensor:
    """A (rows, features) float32 tensor of one real row: stride 0, costs nothing."""
    return randn(1, features, device=device, seed=22).expand(rows, features)


@requires_overcommit_checks
@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
def test_layer_norm_impossible_allocation_raises_then_recovers(use_implementation, device, impl):
    use_implementation(device, impl)
    features = 2**20
    x = _expanded(IMPOSSIBLE_BYTES // (4 * features), features, device)  # out: 2^50 bytes
    assert_raises_out_of_memory(lambda: fastformer.layer_norm_residual(x, x, dropout_p=0.1))
    tensors = layer_norm_inputs((9, 33), torch.float32, device, Flags(), seed=23)
    assert_all_like_reference(*layer_norm_triple(tensors), FP32_ATOL)


@requires_overcommit_checks
@pytest.mark.parametrize("device, impl", KERNEL_IMPLS)
def test_attention_impossible_allocation_raises_then_recovers(use_implementation, device, impl):
    use_implementation(device, impl)
    batch, heads, length, dim = 2**20, 2**14, 2**10, 16  # out: 2^50 bytes in float32
    q = randn(1, 1, 1, dim, device=device, seed=24).expand(batch, heads, length, dim)
    assert_raises_out_of_memory(lambda: fastformer.scaled_dot_product_attention(q, q, q))
    assert_all_like_reference(*attention_triple(attention_inputs(device)), FP32_ATOL)


@requires_overcommit_checks
@pytest.mark.parametrize("device, impl", FEED_FORWARD_IMPLS)
@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
def test_feed_forward_impossible_allocation_raises_then_recovers(
    use_implementation, monkeypatch, device, impl, gemm
):
    """pre = x @ w1.T of 2^24 tokens x 2^24 hidden features: 2^50 bytes from inputs of 64 MiB
    each (feed_forward makes x, w1 and w2 contiguous: stride-0 views get copied). On CPU with
    both GEMM libraries: oneDNN allocates its own outputs, "mkl" writes into fastformer's
    huge-page buffers (the setting does not concern CUDA, which runs once)."""
    use_implementation(device, impl)
    if device != "cpu" and gemm == "mkl":
        pytest.skip("FASTFORMER_CPU_GEMM is a CPU setting")
    monkeypatch.setenv("FASTFORMER_CPU_GEMM", gemm)
    tokens = hidden = 2**24
    x, w1 = _expanded(tokens, 1, device), _expanded(hidden, 1, device)
    w2 = _expanded(1, hidden, device)
    assert_raises_out_of_memory(
        lambda: fastformer.feed_forward(x, w1, None, w2, None, activation="relu")
    )
    tensors = feed_forward_inputs((13,), 16, 40, 16, "gelu", torch.float32, device, seed=26)
    assert_all_like_reference(*feed_forward_triple(tensors), FP32_ATOL)


# ----------------------------------------------------------------------------------------
# 8. Size limits: 64-bit offsets
# ----------------------------------------------------------------------------------------

LARGE = os.environ.get("FASTFORMER_TEST_LARGE") == "1"
requires_large = pytest.mark.skipif(
    not LARGE,
    reason="tensors over 2^31 elements need 13 to 18 GiB of RAM and ~40 s each: "
    "set FASTFORMER_TEST_LARGE=1",
)
ELEMENTS_2_31 = 2**31


def _sample_rows(rows: int) -> list[int]:
    """First, last, and rows whose elements lie past 2^31 (the ones 32-bit offsets break)."""
    return sorted({0, 1, rows // 2, rows - 2, rows - 1})


@requires_large
@pytest.mark.parametrize("device, impl", [CPU, CUDA])
def test_layer_norm_over_2_31_elements(use_implementation, device, impl):
    """(2^17 + 1) x 2^14 bfloat16 (4 GiB each for x, out and grad_x; 12 GiB in all):
    sampled rows of out and of grad_x against the reference on those rows only."""
    use_implementation(device, impl)
    rows, hidden = 2**17 + 1, 2**14
    assert rows * hidden > ELEMENTS_2_31
    dtype = torch.bfloat16
    x = torch.empty(rows, hidden, dtype=dtype, device=device)
    for start in range(0, rows, 8192):  # filled in chunks: no 8 GiB float32 temporary
        chunk = x[start : start + 8192]
        chunk.copy_(torch.randn(chunk.shape, generator=generator(start)).to(dtype))
    weight = 1 + 0.5 * randn(hidden, device=device, seed=27)
    bias = randn(hidden, device=device, seed=28)
    # One row of grad_out repeated (stride 0): the backward reads it as rows of a matrix.
    grad_row = randn(1, hidden, device=device, dtype=dtype, seed=29)
    x.requires_grad_()
    out, _h = fastformer.layer_norm_residual(x, None, weight, bias)
    sample = _sample_rows(rows)
    out_rows = out.detach()[sample].cpu()
    out.backward(grad_row.expand(rows, hidden))
    del out
    grad_rows = x.grad[sample].cpu()
    tensors = {
        "x": x.detach()[sample].cpu(),
        "residual": None,
        "weight": weight.cpu(),
        "bias": bias.cpu(),
    }
    grads = {
        "out": grad_row.cpu().expand(len(sample), hidden),
        "h": torch.zeros(len(sample), hidden),
    }
    same = layer_norm_results(reference.layer_norm_residual, tensors, grads)
    ref64 = layer_norm_results(reference.layer_norm_residual, float64(tensors), grads)
    assert_close_to_reference("out", out_rows, same["out"], ref64["out"], 1e-2)
    assert_close_to_reference("grad_x", grad_rows, same["grad_x"], ref64["grad_x"], 1e-2)


@requires_large
@pytest.mark.parametrize("device, impl", FEED_FORWARD_IMPLS)
def test_feed_forward_over_2_31_elements(use_implementation, device, impl):
    """2^21 tokens x 1025 hidden features, bfloat16: pre, hidden and grad_hidden hold
    2^31 + 2^21 elements (4 GiB each, 12 GiB at the peak of backward)."""
    use_implementation(device, impl)
    tokens, d_model, hidden, d_out = 2**21, 16, 1025, 16
    assert tokens * hidden > ELEMENTS_2_31
    dtype = torch.bfloat16
    tensors = feed_forward_inputs((tokens,), d_model, hidden, d_out, "gelu", dtype, device)
    grad_row = randn(1, d_out, device=device, dtype=dtype, seed=30)
    x = tensors["x"].requires_grad_()
    out = fastformer.feed_forward(
        x, *(tensors[k] for k in ("w1", "b1", "w2", "b2")), recompute=True
    )
    sample = _sample_rows(tokens)
    out_rows = out.detach()[sample].cpu()
    out.backward(grad_row.expand(tokens, d_out))
    del out
    rows = {
        "x": x.detach()[sample].cpu(),
        **{k: tensors[k].cpu() for k in ("w1", "b1", "w2", "b2")},
    }
    grad_out = grad_row.cpu().expand(len(sample), d_out)
    same = feed_forward_results(reference.feed_forward, rows, grad_out)
    ref64 = feed_forward_results(reference.feed_forward, float64(rows), grad_out)
    assert_close_to_reference("out", out_rows, same["out"], ref64["out"], 1e-2)
    assert_close_to_reference("grad_x", x.grad[sample].cpu(), same["grad_x"], ref64["grad_x"], 1e-2)


@requires_large
@pytest.mark.parametrize("device, impl", [CPU, CUDA])
def test_attention_over_2_31_elements(use_implementation, device, impl):
    """out and grad_q of 2049 x 16 x 1024 x 64: 2^31 + 2^20 elements (float32 on CPU, 8 GiB
    each; bfloat16 on CUDA), from q, k, v and grad_out broadcast over the batch (stride 0).
    Through the ops themselves, since autograd would sum grad_q over the broadcast batch:
    the first, a middle and the last batch (past 2^31) against the reference of one batch."""
    use_implementation(device, impl)
    batch, heads, length, source, dim = 2049, 16, 1024, 16, 64
    assert batch * heads * length * dim > ELEMENTS_2_31
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    one = attention_inputs(device, dtype, shape=(1, heads, length, source, dim), seed=32)
    q, k, v = (one[name].expand(batch, -1, -1, -1) for name in ("q", "k", "v"))
    grad_row = randn(1, heads, length, dim, device=device, dtype=dtype, seed=33)
    scale, band = dim**-0.5, (0, -1, -1)  # band: every key visible
    out, _lse, stats, residual = torch.ops.fastformer.attention_fwd(
        q, k, v, None, None, None, scale, 0.0, 0.0, *band, True
    )
    grads = torch.ops.fastformer.attention_bwd(
        grad_row.expand(batch, -1, -1, -1),
        q,
        k,
        v,
        out,
        stats,
        None,
        None,
        None,
        None,
        scale,
        0.0,
        0.0,
        *band,
        residual,
    )
    cpu_one = {name: t.cpu() for name, t in one.items()}
    same = attention_results(reference.scaled_dot_product_attention, cpu_one, grad_row.cpu())
    ref64 = attention_results(
        reference.scaled_dot_product_attention, float64(cpu_one), grad_row.cpu()
    )
    atol = FP32_ATOL if dtype == torch.float32 else 1e-2
    for b in (0, batch // 2, batch - 1):
        fast = {
            "out": out[b : b + 1],
            **dict(zip(("grad_q", "grad_k", "grad_v"), (g[b : b + 1] for g in grads), strict=True)),
        }
        for name, value in fast.items():
            assert_close_to_reference(name, value.cpu(), same[name], ref64[name], atol)


@pytest.mark.parametrize("device, impl", [CPU, CUDA])
def test_attention_batch_times_heads_over_65535(use_implementation, device, impl):
    """257 x 256 = 65792 (batch, head) pairs: more than a CUDA grid's y or z dimension holds."""
    use_implementation(device, impl)
    tensors = attention_inputs(device, shape=(257, 256, 3, 5, 16), seed=31)
    assert_all_like_reference(*attention_triple(tensors, is_causal=True), FP32_ATOL)


class _GridRecorder:
    """Stands in for a Triton kernel: records the grid a launcher asks for, runs nothing."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            meta = {**kwargs, "BLOCK_M": 16, "BLOCK_N": 16}
            self.grids.append(tuple(grid(meta) if callable(grid) else grid))

        return launch


def test_attention_launchers_grid_over_65535_heads(monkeypatch):
    """The launchers' grids for 65792 (batch, head) pairs: one dimension only, holding every
    (batch, head, block), within CUDA's 2^31 - 1 for dimension x. The interpreter would
    take over 10 minutes to run 65792 programs (10 ms each), so the grid is checked instead."""
    from fastformer_kernels import attention, attention_backward

    batch, heads, length, source, dim = 257, 256, 17, 3, 16
    recorders = {}
    for module, name in (
        (attention, "_attention_fwd_kernel"),
        (attention_backward, "_attention_bwd_preprocess_kernel"),
        (attention_backward, "_attention_bwd_dkdv_kernel"),
        (attention_backward, "_attention_bwd_dq_kernel"),
    ):
        recorders[name] = _GridRecorder()
        monkeypatch.setattr(module, name, recorders[name])
    q = torch.zeros(1, 1, 1, dim).expand(batch, heads, length, dim)
    kv = torch.zeros(1, 1, 1, dim).expand(batch, heads, source, dim)
    out, _lse, stats, residual = attention.attention_forward(
        q, kv, kv, None, None, None, 0.25, 0.0, 0.0, 0, -1, -1, False
    )
    attention_backward.attention_backward(
        out, q, kv, kv, out, stats, None, None, None, None, 0.25, 0.0, 0.0, 0, -1, -1, residual
    )
    blocks = {
        "_attention_fwd_kernel": math.ceil(length / 16),
        "_attention_bwd_preprocess_kernel": math.ceil(length / attention._PREPROCESS_BLOCK_M),
        "_attention_bwd_dkdv_kernel": math.ceil(source / 16),
        "_attention_bwd_dq_kernel": math.ceil(length / 16),
    }
    for name, recorder in recorders.items():
        assert recorder.grids == [(blocks[name] * batch * heads,)], name
        assert recorder.grids[0][0] < 2**31, name


# ----------------------------------------------------------------------------------------
# 9. torch.func transforms
# ----------------------------------------------------------------------------------------

_TRANSFORM_CALLS: dict[str, Callable[[Tensor], Tensor]] = {
    "layer_norm_residual": lambda x: fastformer.layer_norm_residual(
        x, x.flip(0), torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)
    )[0],
    "feed_forward": lambda x: fastformer.feed_forward(
        x,
        torch.eye(24, 16, dtype=x.dtype) * 0.7,
        None,
        torch.eye(16, 24, dtype=x.dtype) * 1.3,
        None,
        activation="gelu",
    ),
    "scaled_dot_product_attention": lambda x: fastformer.scaled_dot_product_attention(
        x.view(2, 5, 16), x.view(2, 5, 16).flip(1), x.view(2, 5, 16), is_causal=True
    ),
}


@requires_extension
@pytest.mark.parametrize("op", list(_TRANSFORM_CALLS))
def test_torch_func_transforms_fall_back_and_say_so(op):
    """Inside torch.func.grad or vmap the ops run plain PyTorch (their C++ autograd cannot
    take a transform): the same gradient as autograd through the kernels, and the call
    counted as a fallback."""
    call = _TRANSFORM_CALLS[op]
    x = torch.randn(10, 16, dtype=torch.float64)

    def loss(t: Tensor) -> Tensor:
        return (call(t) * torch.linspace(-1, 1, 16, dtype=t.dtype)).sum()

    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    before = fastformer.info()["fallback_calls"].get(op, 0)
    torch.testing.assert_close(torch.func.grad(loss)(x), expected)
    batched = torch.func.vmap(call)(x[None].expand(3, 10, 16))
    torch.testing.assert_close(batched, call(x)[None].expand(3, *call(x).shape))
    assert fastformer.info()["fallback_calls"][op] == before + 2
