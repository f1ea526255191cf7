"""The shared benchmark harness: the data model (cases, providers, results, targets) and
run_case; timing, memory and the device's peaks are measured by measure.py.

Every suite (one per op) describes its cases and providers with the types below and calls
`run_case`; the runner (runner.py) measures the device's peaks once per run, and report.py
turns the results into a table, JSON, CSV and plots. Rules (docs: DESIGN.md, Benchmarks):

- every ratio is measured side by side in one process (measure.py says how);
- the warm-up absorbs compilation (torch.compile, Triton autotuning), which is never timed;
- throughput is the work a perfect implementation must do (bytes each input read once and
  each output written once, or FLOPs) over the median time, and its share of the device's
  peaks measured in the same run.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from .device import DeviceInfo, Skip, one_line
from .measure import DevicePeaks, Timing, measure_side_by_side, peak_memory, synchronize

# Op suites time "fwd", "bwd" and "fwd+bwd"; model suites a training step ("train") and an
# inference forward ("infer").
Mode = Literal["fwd", "bwd", "fwd+bwd", "train", "infer"]
Status = Literal["ok", "skipped", "failed"]
T = TypeVar("T")

# ----------------------------------------------------------------------------- data model


@dataclass
class Case:
    op: str
    name: str  # shape and variant as printed, e.g. "8192x1024"
    dtype: str
    mode: Mode
    params: dict[str, Any]  # rows, hidden, variant flags: used by targets, CSV and plots
    bytes: int | None = None  # bytes a perfect implementation must move (memory-bound ops)
    flops: int | None = None  # FLOPs it must do (compute-bound ops)
    tokens: int | None = None  # tokens one call processes (models: throughput in tokens/s)


@dataclass
class Measurement:
    provider: str
    status: Status
    reason: str | None = None
    timing: Timing | None = None
    throughput: float | None = None  # GB/s (bytes), TFLOP/s (flops) or tokens/s (tokens)
    unit: str | None = None
    share_of_peak: float | None = None  # of the measured copy bandwidth or matmul rate
    peak_memory_bytes: int | None = None
    warmup_s: float | None = None  # build + first call: torch.compile time lands here
    # What a forward keeps for its backward (harness.activation_memory): measured by suites
    # that have a target on it, else None.
    activation_memory_bytes: int | None = None

    @property
    def ms(self) -> float | None:
        return self.timing.median_ms if self.timing and self.status == "ok" else None


@dataclass
class Result:
    case: Case
    measurements: list[Measurement]

    def get(self, provider: str) -> Measurement | None:
        return next((m for m in self.measurements if m.provider == provider), None)

    def speedup(self, provider: str, baseline: str) -> float | None:
        """How many times faster `provider` is than `baseline` (their time ratio)."""
        mine, theirs = self.get(provider), self.get(baseline)
        if mine is None or theirs is None or mine.ms is None or theirs.ms is None:
            return None
        return theirs.ms / mine.ms


@dataclass
class TargetOutcome:
    target: str
    case: str
    passed: bool | None  # None: could not be decided (no matching case, baseline skipped)
    measured: float | None
    threshold: float
    detail: str


@dataclass
class Target:
    """A goal checked against the results and reported (never asserted), in matching cases:
    "speedup" of `provider` over `baseline` and "share_of_peak" (of the measured peak), one
    outcome per case, so that a threshold of 1.0 on "speedup" reads "never slower";
    "activation_memory", the baseline's activation memory over the provider's (1.0: no
    more than the baseline), one outcome per case; "peak_memory", the same ratio of peak
    memory (Measurement.peak_memory_bytes: "at most 0.6x eager" is a threshold of 1 / 0.6);
    "geomean_speedup", the geometric mean of
    the speedups of all matching cases, one outcome (undecided if any case lacks a ratio)."""

    name: str
    kind: Literal["speedup", "share_of_peak", "activation_memory", "peak_memory", "geomean_speedup"]
    threshold: float
    where: dict[str, Any]  # case fields, params or context (device, threads); list = any of
    provider: str = "fastformer"
    baseline: str | None = None

    def matches(self, case: Case, context: dict[str, Any]) -> bool:
        fields = {"op": case.op, "dtype": case.dtype, "mode": case.mode, **case.params, **context}
        for key, wanted in self.where.items():
            options = wanted if isinstance(wanted, list | tuple) else [wanted]
            if fields.get(key) not in options:
                return False
        return True

    def evaluate(self, results: Sequence[Result], context: dict[str, Any]) -> list[TargetOutcome]:
        matching = [r for r in results if self.matches(r.case, context)]
        if not matching:
            return [
                TargetOutcome(
                    self.name,
                    "-",
                    None,
                    None,
                    self.threshold,
                    "no case of this run matches the target",
                )
            ]
        if self.kind == "geomean_speedup":
            return [self._geomean(matching)]
        outcomes = []
        for result in matching:
            value, detail = self._per_case(result)
            passed = None if value is None else value >= self.threshold
            outcomes.append(
                TargetOutcome(
                    self.name,
                    result.case.name + f" {result.case.mode}",
                    passed,
                    value,
                    self.threshold,
                    detail,
                )
            )
        return outcomes

    def _per_case(self, result: Result) -> tuple[float | None, str]:
        if self.kind == "speedup":
            assert self.baseline is not None
            value = result.speedup(self.provider, self.baseline)
            return value, f"{self.provider} vs {self.baseline}: " + (
                f"{value:.2f}x" if value is not None else self._why_missing(result)
            )
        if self.kind in ("activation_memory", "peak_memory"):
            assert self.baseline is not None
            field = f"{self.kind}_bytes"
            label = self.kind.replace("_", " ")
            mine, theirs = (
                getattr(m, field) if m is not None and m.status == "ok" else None
                for m in (result.get(self.provider), result.get(self.baseline))
            )
            if mine is None or theirs is None:
                return None, f"{label}: {self._why_missing(result)}"
            value = theirs / mine if mine > 0 else (math.inf if theirs > 0 else 1.0)
            return value, (
                f"{label} {self.provider} {mine / 2**20:.1f} MiB, "
                f"{self.baseline} {theirs / 2**20:.1f} MiB ({value:.2f}x)"
            )
        mine = result.get(self.provider)
        value = mine.share_of_peak if mine and mine.status == "ok" else None
        return value, f"{self.provider}: " + (
            f"{value:.0%} of peak" if value is not None else self._why_missing(result)
        )

    def _geomean(self, matching: Sequence[Result]) -> TargetOutcome:
        assert self.baseline is not None
        ratios = {
            f"{r.case.name} {r.case.mode}": r.speedup(self.provider, self.baseline)
            for r in matching
        }
        where = f"geometric mean of {len(ratios)} cases"
        missing = [name for name, ratio in ratios.items() if ratio is None]
        if missing:
            detail = f"{self.provider} vs {self.baseline}: no ratio in " + ", ".join(missing)
            return TargetOutcome(self.name, where, None, None, self.threshold, detail)
        values = [ratio for ratio in ratios.values() if ratio is not None]
        mean = math.exp(sum(math.log(v) for v in values) / len(values))
        worst = min(ratios, key=lambda name: ratios[name] or 0.0)
        detail = (
            f"{self.provider} vs {self.baseline}: geometric mean {mean:.2f}x "
            f"(lowest {ratios[worst]:.2f}x, {worst})"
        )
        return TargetOutcome(self.name, where, mean >= self.threshold, mean, self.threshold, detail)

    def _why_missing(self, result: Result) -> str:
        for name in (self.provider, self.baseline):
            m = result.get(name) if name else None
            if m is not None and m.status != "ok":
                return f"{name} {m.status}: {m.reason}"
        return "not measured"


@dataclass
class Provider:
    """One implementation of a case. `build` prepares inputs and returns the zero-argument
    callable that is timed (one call = one step of the case); it raises Skip when the
    provider cannot run here."""

    name: str
    build: Callable[[], Callable[[], Any]]
    # Errors while building or warming up (compiling) mean "skipped: <prefix>: error"
    # rather than failed: e.g. torch.compile without a working C++ compiler.
    skip_on_error: str | None = None


@dataclass
class Context:
    """What a suite needs to know about the run."""

    device: torch.device
    info: DeviceInfo
    peaks: DevicePeaks
    dtype: torch.dtype | None  # user's choice, else the suite's defaults
    full: bool
    budget_s: float  # CPU timing budget per provider and case

    def pick(self, cpu: T, cpu_full: T, gpu: T, gpu_full: T) -> T:
        """A suite's setting for this run: by device, and whether --full."""
        if self.device.type == "cuda":
            return gpu_full if self.full else gpu
        return cpu_full if self.full else cpu

    def dtypes(
        self, cpu_full: Sequence[torch.dtype], gpu_full: Sequence[torch.dtype]
    ) -> list[torch.dtype]:
        """The dtypes to run: --dtype's, else float32 on CPU and bfloat16 on a GPU, or the
        suite's lists with --full."""
        if self.dtype is not None:
            return [self.dtype]
        return list(self.pick([torch.float32], cpu_full, [torch.bfloat16], gpu_full))

    @property
    def target_context(self) -> dict[str, Any]:
        return {"device": self.device.type, "threads": self.info.threads}


@dataclass
class Suite:
    name: str
    title: str
    providers: list[str]  # the first is the subject; the others are its baselines
    cases: Callable[[Context], list[Case]]
    bench: Callable[[Context, Case], Result]
    targets: Callable[[Context], list[Target]]
    plot_x: str | None = None  # a case param to plot throughput against
    # Providers (among `providers`) that measure a floor of the subject's work, such as its
    # GEMMs alone, beside it: reported as "% of <bound>" (the bound's time over the
    # subject's), never as a baseline to beat.
    bounds: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- running


def input_sets(ctx: Context, set_bytes: int) -> int:
    """How many input sets to rotate through so that the cache cannot hold the next call's
    inputs: on CPU at least 2 and together twice the last-level cache; 1 on GPU, where
    do_bench flushes L2 itself."""
    if ctx.device.type == "cuda":
        return 1
    return max(2, min(8, math.ceil(2 * ctx.info.cache_bytes / max(set_bytes, 1))))


def rotate(items: Sequence[T]) -> Callable[[], T]:
    """A callable returning the items in turn, forever."""
    cycle = itertools.cycle(items)
    return lambda: next(cycle)


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile for a baseline: a fresh compile per case (no recompile limits, no
    silent fallback to eager), whole graph or an error."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def warm_up(ctx: Context, provider: Provider, m: Measurement) -> Callable[[], Any] | None:
    """Build `provider` and make its first call (compilation, autotuning, lazy set-up),
    recording the time in `m.warmup_s`; returns the step to time, or None after recording
    in `m` why the provider is skipped or failed."""
    start = time.perf_counter()
    try:
        step = provider.build()
        step()
        synchronize(ctx.device)
    except Skip as reason:
        m.status, m.reason = "skipped", str(reason)
        return None
    except Exception as error:
        skip = provider.skip_on_error is not None and not _oom(error)
        m.status = "skipped" if skip else "failed"
        m.reason = (f"{provider.skip_on_error}: " if skip else "") + one_line(error)
        _release(ctx.device)
        return None
    m.warmup_s = time.perf_counter() - start
    return step


def record_timing(ctx: Context, case: Case, m: Measurement, timing: Timing) -> None:
    """Store `timing` in `m` with the throughput it means and its share of the peaks."""
    m.timing = timing
    seconds = timing.median_ms * 1e-3
    if case.bytes is not None:
        m.throughput, m.unit = case.bytes / seconds / 1e9, "GB/s"
        m.share_of_peak = m.throughput / ctx.peaks.copy_gbps
    elif case.flops is not None:
        m.throughput, m.unit = case.flops / seconds / 1e12, "TFLOP/s"
        peak = ctx.peaks.matmul_tflops.get(case.dtype)
        m.share_of_peak = m.throughput / peak if peak else None
    elif case.tokens is not None:  # no device peak to compare tokens/s with
        m.throughput, m.unit = case.tokens / seconds, "tokens/s"


# How a case's providers are timed: side by side (below), or by pytest-benchmark
# (benchmarks/test_suites.py), which installs its own runner with `case_runner`.
CaseRunner = Callable[[Context, Case, Sequence[Provider]], Result]
_case_runner: contextvars.ContextVar[CaseRunner | None] = contextvars.ContextVar(
    "case_runner", default=None
)


@contextlib.contextmanager
def case_runner(runner: CaseRunner) -> Iterator[None]:
    """Within this block, `run_case` hands every case to `runner`."""
    token = _case_runner.set(runner)
    try:
        yield
    finally:
        _case_runner.reset(token)


def run_case(ctx: Context, case: Case, providers: Sequence[Provider]) -> Result:
    """Build and warm up every provider, time them side by side, then measure peak memory.
    A provider that cannot run is recorded as skipped or failed, never fatal."""
    runner = _case_runner.get()
    if runner is not None:
        return runner(ctx, case, providers)
    measurements = {p.name: Measurement(p.name, "ok") for p in providers}
    steps: dict[str, Callable[[], Any]] = {}
    for provider in providers:
        step = warm_up(ctx, provider, measurements[provider.name])
        if step is not None:
            steps[provider.name] = step
    for name, timing in measure_side_by_side(
        steps, device=ctx.device, budget_s=ctx.budget_s
    ).items():
        m = measurements[name]
        record_timing(ctx, case, m, timing)
        try:
            m.peak_memory_bytes = peak_memory(steps[name], ctx.device)
        except RuntimeError:  # out of memory with its outputs: keep the timing anyway
            _release(ctx.device)
    steps.clear()
    _release(ctx.device)
    return Result(case, [measurements[p.name] for p in providers])


def failed_case(case: Case, providers: Sequence[str], error: BaseException) -> Result:
    """A case whose inputs could not even be built (e.g. out of memory)."""
    reason = one_line(error)
    return Result(case, [Measurement(name, "failed", reason) for name in providers])


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
