"""Results out of the harness: a rich table per suite, JSON and CSV per device, PNG plots.

The JSON file (results/<device slug>.json) keeps one entry per suite; running a subset of
suites replaces only those entries, and each entry carries its own date and device peaks,
because its ratios and shares are only meaningful against figures from the same run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .device import DeviceInfo
from .harness import Case, DevicePeaks, Result, TargetOutcome

SCHEMA_VERSION = 1


@dataclass
class SuiteRun:
    suite: str
    title: str
    providers: list[str]  # the first is the subject
    plot_x: str | None
    date: str
    settings: dict[str, Any]  # threads, dtype choice, full, timing budget
    peaks: DevicePeaks
    results: list[Result]
    targets: list[TargetOutcome]


# ----------------------------------------------------------------------------- table


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _cell(result: Result, provider: str) -> str:
    m = result.get(provider)
    if m is None or m.status == "skipped":
        return "[dim]skip[/]"
    return _ms(m.ms) if m.ms is not None else "[red]fail[/]"


def _unit(case: Case) -> str:
    if case.bytes is not None:
        return "GB/s"
    return "tokens/s" if case.tokens is not None else "TFLOP/s"


def print_table(console: Console, run: SuiteRun, device: DeviceInfo) -> None:
    subject, *baselines = run.providers
    # Baselines skipped in every case get no column; the reason is printed below instead.
    shown = [
        b
        for b in baselines
        if any(m is not None and m.status != "skipped" for m in (r.get(b) for r in run.results))
    ]
    dtypes = sorted({r.case.dtype for r in run.results})
    where = f"{device.name}, {device.threads} threads" if device.type == "cpu" else device.name
    table = Table(title=f"{run.title}: {where}" + (f", {dtypes[0]}" if len(dtypes) == 1 else ""))
    units = "|".join(sorted({_unit(r.case) for r in run.results}))
    for header in [
        "case",
        "mode",
        *(["dtype"] if len(dtypes) > 1 else []),
        f"{subject} ms",
        *(f"{b} ms" for b in shown),
        *(f"vs {b}" for b in shown),
        units,
        "% peak",
        "peak MiB",
        "",
    ]:
        table.add_column(header, justify="left" if header in ("case", "mode", "") else "right")
    for result in run.results:
        mine = result.get(subject)
        speedups = []
        for b in shown:
            x = result.speedup(subject, b)
            speedups.append("-" if x is None else f"[{'green' if x >= 1 else 'red'}]{x:.2f}x[/]")
        ok = mine is not None and mine.status == "ok"
        baseline_ms = {b: m.ms for b in shown if (m := result.get(b)) and m.ms is not None}
        mark = ""
        if not ok:
            mark = f"[red]{subject} {mine.status if mine else 'missing'}[/]"
        elif baseline_ms and mine.ms > min(baseline_ms.values()):
            mark = f"[bold red]<< slower than {min(baseline_ms, key=baseline_ms.get)}[/]"
        table.add_row(
            result.case.name,
            result.case.mode,
            *([result.case.dtype] if len(dtypes) > 1 else []),
            _cell(result, subject),
            *(_cell(result, b) for b in shown),
            *speedups,
            f"{mine.throughput:.{0 if mine.unit == 'tokens/s' else 1}f}"
            if ok and mine.throughput is not None
            else "-",
            f"{mine.share_of_peak:.0%}" if ok and mine.share_of_peak is not None else "-",
            _mib(mine.peak_memory_bytes) if ok else "-",
            mark,
        )
    console.print(table)
    peaks = ", ".join(f"{d} matmul {v:.2f} TFLOP/s" for d, v in run.peaks.matmul_tflops.items())
    if units != "tokens/s":  # a model's tokens/s has no device peak to be a share of
        console.print(
            f"measured peaks: copy {run.peaks.copy_gbps:.1f} GB/s, {peaks}; "
            f"'% peak' = {subject}'s GB/s over the copy bandwidth (TFLOP/s over matmul)"
        )
    reasons: dict[str, set[str]] = defaultdict(set)
    for result in run.results:
        for m in result.measurements:
            if m.status != "ok":
                reasons[f"{m.provider} {m.status}"].add(m.reason or "")
    for key, texts in reasons.items():
        console.print(f"[dim]{key}: {'; '.join(sorted(texts))}[/]")
    for outcome in run.targets:
        verdict = {True: "[green]PASS[/]", False: "[bold red]FAIL[/]", None: "[yellow]n/a[/]"}
        console.print(
            f"target {verdict[outcome.passed]} {outcome.target} [{outcome.case}]: "
            f"{outcome.detail} (threshold {outcome.threshold:g})"
        )


# ----------------------------------------------------------------------------- JSON and CSV


def suite_record(run: SuiteRun) -> dict[str, Any]:
    record = dataclasses.asdict(run)
    subject = run.providers[0]
    for result, row in zip(run.results, record["results"], strict=True):
        row["speedup_of_subject"] = {b: result.speedup(subject, b) for b in run.providers[1:]}
    return record


def write_json(
    out_dir: Path, device: DeviceInfo, runs: list[SuiteRun], implementation: Any = None
) -> tuple[Path, dict]:
    """Merge these suites into results/<slug>.json (other suites' entries are kept).
    implementation: fastformer.info() of this run (which kernels ran)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device.slug}.json"
    suites: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            if previous.get("schema") == SCHEMA_VERSION:
                suites = previous.get("suites", {})
        except (OSError, ValueError):
            pass  # an unreadable file is replaced
    for run in runs:
        suites[run.suite] = suite_record(run)
    document = {
        "schema": SCHEMA_VERSION,
        "device": dataclasses.asdict(device),
        "fastformer": implementation,
        "suites": suites,
    }
    # default=str: fastformer.info() may hold non-JSON values (dtypes, devices)
    document = json.loads(json.dumps(document, default=str))
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path, document


def write_csv(out_dir: Path, device: DeviceInfo, document: dict[str, Any]) -> Path:
    """One row per case x provider, every suite of the JSON document."""
    rows = []
    for suite, record in document["suites"].items():
        for result in record["results"]:
            case = result["case"]
            for m in result["measurements"]:
                timing = m["timing"] or {}
                rows.append(
                    {
                        "suite": suite,
                        "date": record["date"],
                        "op": case["op"],
                        "case": case["name"],
                        "dtype": case["dtype"],
                        "mode": case["mode"],
                        **{f"param_{k}": v for k, v in case["params"].items()},
                        "provider": m["provider"],
                        "status": m["status"],
                        "reason": m["reason"],
                        "median_ms": timing.get("median_ms"),
                        "p20_ms": timing.get("p20_ms"),
                        "p80_ms": timing.get("p80_ms"),
                        "repeats": timing.get("repeats"),
                        "throughput": m["throughput"],
                        "unit": m["unit"],
                        "share_of_peak": m["share_of_peak"],
                        "peak_memory_bytes": m["peak_memory_bytes"],
                        "warmup_s": m["warmup_s"],
                        "subject_speedup": result["speedup_of_subject"].get(m["provider"]),
                    }
                )
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path = out_dir / f"{device.slug}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- plots


def plot(out_dir: Path, device: DeviceInfo, run: SuiteRun) -> list[Path]:
    """Throughput against run.plot_x, one line per provider, one file per dtype and one
    panel per mode and variant; the measured peak is drawn as a dashed line."""
    if run.plot_x is None:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for dtype in sorted({r.case.dtype for r in run.results}):
        # One panel per (variant, mode): variants down, modes across.
        groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
        for r in run.results:
            if r.case.dtype == dtype and run.plot_x in r.case.params:
                variant = ", ".join(f"{k}={v}" for k, v in r.case.params.items() if k != run.plot_x)
                groups[variant, r.case.mode].append(r)
        if not groups:
            continue
        variants = list(dict.fromkeys(v for v, _ in groups))
        modes = list(dict.fromkeys(m for _, m in groups))
        fig, axes = plt.subplots(
            len(variants), len(modes), squeeze=False, figsize=(6 * len(modes), 4.2 * len(variants))
        )
        for ax in axes.flat:
            ax.set_visible(False)
        for (variant, mode), results in groups.items():
            ax = axes[variants.index(variant)][modes.index(mode)]
            ax.set_visible(True)
            title = f"{mode}, {variant}" if variant else mode
            unit = "GB/s"
            for provider in run.providers:
                points = sorted(
                    (r.case.params[run.plot_x], m.throughput)
                    for r in results
                    if (m := r.get(provider)) and m.throughput is not None
                )
                unit = next((m.unit for r in results if (m := r.get(provider)) and m.unit), unit)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=provider)
            peak = {
                "GB/s": run.peaks.copy_gbps,
                "TFLOP/s": run.peaks.matmul_tflops.get(dtype),
            }.get(unit)  # tokens/s: no device peak
            if peak:
                ax.axhline(peak, linestyle="--", color="grey", label="measured peak")
            ax.set_xscale("log", base=2)
            xs = sorted({r.case.params[run.plot_x] for r in results})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(bottom=0)
            ax.set_xlabel(run.plot_x)
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        threads = f", {device.threads} threads" if device.type == "cpu" else ""
        fig.suptitle(f"{run.title}: {device.name}{threads}, {dtype}")
        fig.tight_layout()
        path = out_dir / f"{device.slug}-{run.suite}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
