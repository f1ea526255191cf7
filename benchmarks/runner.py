"""The entry point of the benchmarks: the registry of suites and `run`.

`fastformer bench` (fastformer/__main__.py) calls `run`. A suite is a module holding
`SUITE: harness.Suite`; adding one is a line in SUITES.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from . import report
from .device import describe_device, load_average
from .harness import Context, Result, Suite, failed_case
from .measure import device_peaks, dtype_name, parse_dtype, peak_memory_method

# Suite name (the op's name) -> module of this package holding SUITE.
SUITES: dict[str, str] = {
    "layer_norm_residual": ".bench_layer_norm_residual",
    "attention": ".bench_attention",
    "feed_forward": ".bench_feed_forward",
    "transformer": ".bench_transformer",
    # Last: a bounded GPU run (tools/gpu_checks.sh) reaches the op suites' targets first.
    "attention_variants": ".bench_attention_variants",
}


def default_out_dir(package: Path) -> Path:
    """Where results go unless told: results/ beside the suites in a source checkout (the
    package folder is benchmarks/, next to setup.py), where the README's result tables are
    written from; once installed, ./fastformer-bench-results, relative to the current folder,
    since site-packages may be read-only and holds the results shipped with the package."""
    if package.name == "benchmarks" and (package.parent / "setup.py").is_file():
        return package / "results"
    return Path("fastformer-bench-results")


DEFAULT_OUT_DIR = default_out_dir(Path(__file__).resolve().parent)
# CPU timings are pinned to this many threads (FASTFORMER_BENCH_THREADS overrides), so that
# results of one machine are comparable between runs; the count is part of the file name.
DEFAULT_CPU_THREADS = 2
# CPU timing budget per provider and case, in seconds (GPU: do_bench's own window).
BUDGET_S = {False: 1.0, True: 2.0}


def load_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name], __package__).SUITE


def resolve_device(device: str | None) -> torch.device:
    """The device to benchmark: "cpu", "cuda" or "cuda:<index>" (default: cuda when
    available); ValueError for another name, or for cuda where torch sees no CUDA device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu or cuda, got {device!r}")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        why = "sees no GPU" if torch.version.cuda else "is built for CPU only"
        raise ValueError(
            f"no CUDA device is available for {device!r} (torch {torch.__version__} {why})"
        )
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def cpu_threads(threads: int | None) -> int:
    """The CPU threads to pin: `threads`, else FASTFORMER_BENCH_THREADS, else
    DEFAULT_CPU_THREADS, at most the cores there are; ValueError unless an integer >= 1."""
    if threads is None:
        text = os.environ.get("FASTFORMER_BENCH_THREADS", str(DEFAULT_CPU_THREADS))
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(f"FASTFORMER_BENCH_THREADS must be an integer >= 1, got {text!r}")
        threads = int(text)
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return min(threads, os.cpu_count() or threads)


def _fastformer_info() -> Any:
    """fastformer.info() (which implementation each op uses), recorded with the results."""
    try:
        import fastformer

        return fastformer.info()
    except Exception as error:  # the package under test may be half-built: still benchmark
        return f"unavailable: {type(error).__name__}: {error}"


def run(
    ops: list[str] | None = None,
    dtype: str | None = None,
    out_dir: Path = DEFAULT_OUT_DIR,
    full: bool = False,
    *,
    device: str | None = None,
    threads: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the chosen suites (all when `ops` is None) and write results under `out_dir`.

    dtype: one dtype for every suite instead of their defaults ("bf16", "float32", ...).
    full: the long sweep (more sizes, dtypes and variants). device: "cuda" or "cpu"
    (default: cuda when available; ValueError without CUDA). threads: CPU threads to pin
    (default 2). Every argument is checked before anything runs.
    Returns the JSON document written, plus "files": the paths written.
    """
    # Piped output (CI logs) gets a wide table rather than rich's 80-column default.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = console or Console(width=None if wide else 180)
    suites = [load_suite(name) for name in (ops or list(SUITES))]
    chosen_dtype = parse_dtype(dtype) if dtype else None
    target = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if target.type == "cpu":
        torch.set_num_threads(cpu_threads(threads))
    try:
        return _run(suites, chosen_dtype, Path(out_dir), full, target, console)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    suites: list[Suite],
    dtype: torch.dtype | None,
    out_dir: Path,
    full: bool,
    device: torch.device,
    console: Console,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = describe_device(device)
    console.print(
        f"[bold]{info.name}[/] ({info.slug}), torch {info.torch}, triton {info.triton}, "
        f"python {info.python}"
        + (f", {info.threads} threads" if device.type == "cpu" else f", CUDA {info.cuda}")
    )
    if (
        device.type == "cpu"
        and info.load_average
        and info.cpu_count
        and (info.load_average[0] > 0.25 * info.cpu_count)
    ):
        console.print(
            f"[bold yellow]warning:[/] load average {info.load_average[0]:.1f} on "
            f"{info.cpu_count} cores before starting: other processes compete for "
            "the CPU and the timings will be noisy"
        )
    runs: list[report.SuiteRun] = []
    # Set by the first suite (there is always one).
    json_path, csv_path, document = out_dir / f"{info.slug}.json", out_dir / f"{info.slug}.csv", {}
    plots = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("measuring device peaks (copy, matmul)", total=None)
        peaks = device_peaks(device, dtype)
        progress.remove_task(task)
        for suite in suites:
            suite_start = time.perf_counter()
            ctx = Context(device, info, peaks, dtype, full, BUDGET_S[full])
            cases = suite.cases(ctx)
            task = progress.add_task(suite.name, total=len(cases))
            results: list[Result] = []
            for case in cases:
                progress.update(
                    task, description=f"{suite.name}: {case.name} {case.mode} {case.dtype}"
                )
                try:
                    results.append(suite.bench(ctx, case))
                except Exception as error:  # inputs could not be built: record, go on
                    results.append(failed_case(case, suite.providers, error))
                progress.advance(task)
            progress.remove_task(task)
            outcomes = [
                o for t in suite.targets(ctx) for o in t.evaluate(results, ctx.target_context)
            ]
            settings = {
                "threads": info.threads,
                "full": full,
                "budget_s": ctx.budget_s,
                "dtype": dtype_name(dtype) if dtype else "suite default",
                "peak_memory": peak_memory_method(device),
                "load_average_after": load_average(),
                # wall time of the suite: building, compiling, warm-up, timing, memory
                "duration_s": round(time.perf_counter() - suite_start, 1),
            }
            run = report.SuiteRun(
                suite.name,
                suite.title,
                suite.providers,
                suite.plot_x,
                info.date,
                settings,
                peaks,
                results,
                outcomes,
                list(suite.bounds),
            )
            report.print_table(console, run, info)
            plots += report.plot(out_dir, info, run)
            runs.append(run)
            # Written after every suite: a run cut short (a time limit on a lent GPU) keeps
            # the suites it finished.
            json_path, document = report.write_json(out_dir, info, runs, _fastformer_info())
            csv_path = report.write_csv(out_dir, info, document)
    console.print(f"results: {json_path}, {csv_path}" + "".join(f", {p}" for p in plots))
    return {**document, "files": [str(p) for p in (json_path, csv_path, *plots)]}
