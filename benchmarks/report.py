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
from .harness import Case, Measurement, Result, TargetOutcome
from .measure import DevicePeaks, Timing

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
    # harness.Suite.bounds; None in records written before suites had them
    bounds: list[str] | None = None


# ----------------------------------------------------------------------------- table


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


@dataclass
class Cell:
    text: str
    style: str | None = None  # rich style; Markdown drops it


def _time_cell(result: Result, provider: str) -> Cell:
    m = result.get(provider)
    if m is None or m.status == "skipped":
        return Cell("skip", "dim")
    return Cell(_ms(m.ms)) if m.ms is not None else Cell("fail", "red")


def _unit(case: Case) -> str:
    if case.bytes is not None:
        return "GB/s"
    return "tokens/s" if case.tokens is not None else "TFLOP/s"


def _ran(run: SuiteRun, providers: list[str]) -> list[str]:
    """The providers that ran in some case: one skipped in every case gets no column (the
    reason is listed under the table instead)."""
    return [
        b
        for b in providers
        if any(m is not None and m.status != "skipped" for m in (r.get(b) for r in run.results))
    ]


def _shown_baselines(run: SuiteRun) -> list[str]:
    return _ran(run, [b for b in run.providers[1:] if b not in (run.bounds or [])])


def tabulate(run: SuiteRun) -> tuple[list[str], list[list[Cell]]]:
    """The suite's table, the same for the terminal and the README: per case the subject's
    median time, each baseline's, the speedups, the subject's throughput, share of the
    measured peak, peak memory, activation memory (subject / first baseline) where
    measured, and a mark where the subject is slower than the best baseline. Bounds
    (harness.Suite.bounds) get their time and "% of <bound>": how close the subject comes
    to them."""
    subject = run.providers[0]
    shown = _shown_baselines(run)
    bounds = _ran(run, run.bounds or [])
    dtypes = sorted({r.case.dtype for r in run.results})
    with_activation = any(
        m.activation_memory_bytes is not None for r in run.results for m in r.measurements
    )
    headers = [
        "case",
        "mode",
        *(["dtype"] if len(dtypes) > 1 else []),
        f"{subject} ms",
        *(f"{b} ms" for b in shown),
        *(f"vs {b}" for b in shown),
        *(f"{b} ms" for b in bounds),
        *(f"% of {b}" for b in bounds),
        "|".join(sorted({_unit(r.case) for r in run.results})),
        "% peak",
        "peak MiB",
        *(
            [f"activation MiB ({subject}" + (f" / {shown[0]})" if shown else ")")]
            if with_activation
            else []
        ),
        "",
    ]
    rows = []
    for result in run.results:
        mine = result.get(subject)
        ok = mine is not None and mine.status == "ok"
        speedups = []
        for b in shown:
            x = result.speedup(subject, b)
            speedups.append(
                Cell("-") if x is None else Cell(f"{x:.2f}x", "green" if x >= 1 else "red")
            )
        floors = []
        for b in bounds:
            x = result.speedup(subject, b)  # the bound's time over the subject's
            floors.append(Cell("-") if x is None else Cell(f"{x:.0%}"))
        baseline_ms = {b: m.ms for b in shown if (m := result.get(b)) and m.ms is not None}
        mark = Cell("")
        if not ok:
            mark = Cell(f"{subject} {mine.status if mine else 'missing'}", "red")
        elif baseline_ms and mine.ms > min(baseline_ms.values()):
            mark = Cell(f"<< slower than {min(baseline_ms, key=baseline_ms.get)}", "bold red")
        activation = []
        if with_activation:
            sides = [result.get(name) for name in [subject, *shown[:1]]]
            saved = [m.activation_memory_bytes if m else None for m in sides]
            text = " / ".join(_mib(b) for b in saved) if any(b is not None for b in saved) else "-"
            activation = [Cell(text)]
        rows.append(
            [
                Cell(result.case.name),
                Cell(result.case.mode),
                *([Cell(result.case.dtype)] if len(dtypes) > 1 else []),
                _time_cell(result, subject),
                *(_time_cell(result, b) for b in shown),
                *speedups,
                *(_time_cell(result, b) for b in bounds),
                *floors,
                Cell(
                    f"{mine.throughput:.{0 if mine.unit == 'tokens/s' else 1}f}"
                    if ok and mine.throughput is not None
                    else "-"
                ),
                Cell(f"{mine.share_of_peak:.0%}" if ok and mine.share_of_peak is not None else "-"),
                Cell(_mib(mine.peak_memory_bytes) if ok else "-"),
                *activation,
                mark,
            ]
        )
    return headers, rows


def notes(run: SuiteRun) -> list[Cell]:
    """What the table needs beside it: the measured peaks, why baselines were skipped or
    failed, and the targets' outcomes."""
    subject = run.providers[0]
    lines = []
    if any(_unit(r.case) != "tokens/s" for r in run.results):  # tokens/s has no device peak
        peaks = ", ".join(f"{d} matmul {v:.2f} TFLOP/s" for d, v in run.peaks.matmul_tflops.items())
        lines.append(
            Cell(
                f"measured peaks: copy {run.peaks.copy_gbps:.1f} GB/s, {peaks}; "
                f"'% peak' = {subject}'s GB/s over the copy bandwidth (TFLOP/s over matmul)"
            )
        )
    reasons: dict[str, set[str]] = defaultdict(set)
    for result in run.results:
        for m in result.measurements:
            if m.status != "ok":
                reasons[f"{m.provider} {m.status}"].add(m.reason or "")
    lines += [Cell(f"{key}: {'; '.join(sorted(texts))}", "dim") for key, texts in reasons.items()]
    verdicts = {True: ("PASS", "green"), False: ("FAIL", "bold red"), None: ("n/a", "yellow")}
    for outcome in run.targets:
        verdict, style = verdicts[outcome.passed]
        lines.append(
            Cell(
                f"target {verdict} {outcome.target} [{outcome.case}]: {outcome.detail} "
                f"(threshold {outcome.threshold:g})",
                style,
            )
        )
    return lines


def title(run: SuiteRun, device: DeviceInfo) -> str:
    dtypes = sorted({r.case.dtype for r in run.results})
    where = f"{device.name}, {device.threads} threads" if device.type == "cpu" else device.name
    return f"{run.title}: {where}" + (f", {dtypes[0]}" if len(dtypes) == 1 else "")


def _styled(cell: Cell) -> str:
    return f"[{cell.style}]{cell.text}[/]" if cell.style and cell.text else cell.text


def print_table(console: Console, run: SuiteRun, device: DeviceInfo) -> None:
    headers, rows = tabulate(run)
    table = Table(title=title(run, device))
    for header in headers:
        table.add_column(header, justify="left" if header in ("case", "mode", "") else "right")
    for row in rows:
        table.add_row(*(_styled(cell) for cell in row))
    console.print(table)
    for line in notes(run):
        console.print(_styled(line))


def markdown_table(run: SuiteRun) -> str:
    """The table of `tabulate` in Markdown (no colours; marks in words)."""
    headers, rows = tabulate(run)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.text for cell in row) + " |" for row in rows]
    return "\n".join(lines)


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


def load_runs(path: Path) -> tuple[DeviceInfo, dict[str, SuiteRun]]:
    """A results file read back: its device and every suite's run, as `run` wrote them."""
    document = json.loads(Path(path).read_text())
    if document.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema {document.get('schema')}, expected {SCHEMA_VERSION}")
    device = DeviceInfo(**document["device"])
    runs = {}
    for name, record in document["suites"].items():
        results = [
            Result(
                Case(**row["case"]),
                [
                    Measurement(**{**m, "timing": Timing(**m["timing"]) if m["timing"] else None})
                    for m in row["measurements"]
                ],
            )
            for row in record["results"]
        ]
        runs[name] = SuiteRun(
            record["suite"],
            record["title"],
            record["providers"],
            record["plot_x"],
            record["date"],
            record["settings"],
            DevicePeaks(**record["peaks"]),
            results,
            [TargetOutcome(**t) for t in record["targets"]],
            record.get("bounds"),
        )
    return device, runs


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
