"""pytest-benchmark over the suites: `pytest benchmarks/ --benchmark-json out.json`.

Every case x provider of the chosen suites becomes one test, grouped by op and shape, so
pytest-benchmark's table puts the providers of a case side by side. The cases, inputs and
providers are the suites' own (the same as `fastformer bench`); only the timing differs:
pytest-benchmark's calibrated rounds instead of the harness's interleaved rounds.

Options: --bench-ops (suites, default all), --bench-dtype, --bench-full, --bench-device,
--bench-threads (CPU threads, default 2 as in `fastformer bench`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from .device import describe_device
from .harness import Case, Context
from .measure import device_peaks, parse_dtype
from .runner import BUDGET_S, DEFAULT_CPU_THREADS, SUITES, load_suite


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastformer benchmarks")
    group.addoption("--bench-ops", nargs="+", choices=list(SUITES), help="suites (default: all)")
    group.addoption("--bench-dtype", help="one dtype instead of the suites' defaults")
    group.addoption("--bench-full", action="store_true", help="the complete sweeps (slow)")
    group.addoption("--bench-device", choices=["cpu", "cuda"], help="default: cuda if available")
    group.addoption(
        "--bench-threads", type=int, help=f"CPU threads (default {DEFAULT_CPU_THREADS})"
    )


@dataclass(frozen=True)
class BenchItem:
    """One test: a provider of a case of a suite."""

    suite: str
    case: Case
    provider: str

    @property
    def group(self) -> str:
        return f"{self.suite} {self.case.name} {self.case.mode} {self.case.dtype}"


def _context(config: pytest.Config) -> Context:
    """The run's context, built once per session: the device and its measured peaks."""
    cached = getattr(config, "_fastformer_bench_context", None)
    if cached is not None:
        return cached
    device = torch.device(
        config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cpu":
        # Pinned as in `fastformer bench`, so that the two modes time the same thing.
        wanted = config.getoption("--bench-threads") or int(
            os.environ.get("FASTFORMER_BENCH_THREADS", DEFAULT_CPU_THREADS)
        )
        torch.set_num_threads(max(1, min(wanted, os.cpu_count() or wanted)))
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype_name = config.getoption("--bench-dtype")
    dtype = parse_dtype(dtype_name) if dtype_name else None
    full = config.getoption("--bench-full")
    context = Context(
        device,
        describe_device(device),
        device_peaks(device, dtype),
        dtype,
        full,
        BUDGET_S[full],
    )
    config._fastformer_bench_context = context  # type: ignore[attr-defined]
    return context


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_item" not in metafunc.fixturenames:
        return
    ctx = _context(metafunc.config)
    items = [
        BenchItem(name, case, provider)
        for name in metafunc.config.getoption("--bench-ops") or list(SUITES)
        for suite in [load_suite(name)]
        for case in suite.cases(ctx)
        for provider in suite.providers
    ]
    metafunc.parametrize(
        "bench_item",
        items,
        ids=[
            f"{i.suite}/{i.case.name}/{i.case.mode}/{i.case.dtype}/{i.provider}".replace(" ", "_")
            for i in items
        ],
    )


@pytest.fixture(scope="session")
def bench_context(request: pytest.FixtureRequest) -> Context:
    return _context(request.config)
