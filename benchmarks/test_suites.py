"""Every suite's cases under pytest-benchmark (see conftest.py): one test per case x provider.

A provider that cannot run here (a library not installed, an SDPA backend that declines the
case, torch.compile without a compiler) is skipped with its reason; one that fails is a
test failure. With --benchmark-disable each step runs once (the CI smoke test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from .conftest import BenchItem
from .harness import (
    Case,
    Context,
    Measurement,
    Provider,
    Result,
    case_runner,
    record_timing,
    warm_up,
)
from .measure import timing_of_samples
from .runner import load_suite


def _synchronized(step: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """pytest-benchmark reads a host clock: on a GPU each call must wait for its kernels."""
    if device.type != "cuda":
        return step

    def call() -> Any:
        result = step()
        torch.cuda.synchronize(device)
        return result

    return call


def test_benchmark(benchmark, bench_item: BenchItem, bench_context: Context) -> None:
    ctx = bench_context
    benchmark.group = bench_item.group
    benchmark.extra_info.update(
        {"suite": bench_item.suite, "provider": bench_item.provider, "device": ctx.info.name}
    )

    def time_one_provider(ctx: Context, case: Case, providers: Sequence[Provider]) -> Result:
        provider = next(p for p in providers if p.name == bench_item.provider)
        m = Measurement(provider.name, "ok")
        step = warm_up(ctx, provider, m)
        if step is None:
            if m.status == "skipped":
                pytest.skip(f"{provider.name}: {m.reason}")
            pytest.fail(f"{provider.name} failed: {m.reason}")
        benchmark(_synchronized(step, ctx.device))
        if benchmark.stats is not None:  # None under --benchmark-disable
            samples_ms = [seconds * 1e3 for seconds in benchmark.stats.stats.data]
            record_timing(ctx, case, m, timing_of_samples(samples_ms, "pytest-benchmark"))
            benchmark.extra_info.update(
                {"throughput": m.throughput, "unit": m.unit, "share_of_peak": m.share_of_peak}
            )
        return Result(case, [m])

    with case_runner(time_one_provider):
        result = load_suite(bench_item.suite).bench(ctx, bench_item.case)
    measured = result.get(bench_item.provider)
    assert measured is not None and measured.status == "ok"
    if measured.activation_memory_bytes is not None:
        benchmark.extra_info["activation_memory_bytes"] = measured.activation_memory_bytes
