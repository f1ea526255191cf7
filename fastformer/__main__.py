"""The command line: `fastformer info`, `fastformer bench` and `fastformer train` (also
`python -m fastformer`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_info(as_json: bool) -> None:
    from fastformer import info

    report = info()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    # Piped output (logs, tests) gets a wide table rather than rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 140)
    versions = ", ".join(
        f"{name} {version}" for name, version in report["versions"].items() if version is not None
    )
    console.print(f"[bold]fastformer[/bold]  {versions}")
    console.print(f"device: {report['device']}")
    extension = report["extension"]
    console.print(
        "extension fastformer._C: "
        + ("built" if extension["available"] else f"[red]missing[/red] ({extension['error']})")
    )
    triton = report["triton"]
    console.print(
        f"triton: installed={triton['installed']} gpu={triton['gpu']} "
        f"interpreter={triton['interpreter']} runs_cpu_tensors={triton['runs_cpu_tensors']} "
        f"autotune={triton['autotune']}"
    )
    table = Table(title="implementation per op, device and dtype")
    table.add_column("op", no_wrap=True)
    table.add_column("device")
    dtypes = ["float32", "float16", "bfloat16", "float64"]
    for dtype in dtypes:
        table.add_column(dtype)
    for op, devices in report["ops"].items():
        for device, by_dtype in devices.items():
            table.add_row(op, device, *(by_dtype[d] for d in dtypes))
    console.print(table)
    cache = report["cpu_output_cache"]
    if cache is not None:
        console.print(
            f"CPU output cache: {cache['cached_mib']:.0f} of {cache['limit_mib']:.0f} MiB held, "
            f"{cache['reuses']} reuses, {cache['fresh_allocations']} fresh"
        )
    if report["cpu_gemm"] is not None:
        console.print(f"CPU feed-forward GEMMs (x @ W.T): {report['cpu_gemm']}")
    if report["fallback_calls"]:
        console.print(f"calls that fell back to PyTorch: {report['fallback_calls']}")


def main(argv: list[str] | None = None) -> int:
    from fastformer_benchmarks import DEFAULT_OUT_DIR, SUITES, run
    from fastformer_benchmarks.measure import parse_dtype
    from fastformer_benchmarks.runner import resolve_device

    from fastformer.models import train as training
    from fastformer.models.config import Bound

    # Every option is checked while parsing (argparse types), so that a bad one ends in
    # argparse's one-line error and exit code 2, before any work.
    parser = argparse.ArgumentParser(prog="fastformer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="versions, device and which kernels run")
    info_parser.add_argument("--json", action="store_true", help="print JSON")
    bench = commands.add_parser("bench", help="benchmark the kernels on this machine's device")
    bench.add_argument("--ops", nargs="+", help="suites to run (default: all)")
    bench.add_argument(
        "--dtype",
        type=training.checked_option(parse_dtype),
        help="dtype to benchmark (default: the device's usual one)",
    )
    # Absolute in a source checkout (benchmarks/results), else relative to the current folder.
    where = "" if DEFAULT_OUT_DIR.is_absolute() else ", in the current folder"
    bench.add_argument(
        "--out",
        type=training.checked_option(training.check_out_folder),
        default=str(DEFAULT_OUT_DIR),
        help=f"output folder for JSON, CSV and plots (default: {DEFAULT_OUT_DIR}{where})",
    )
    bench.add_argument("--full", action="store_true", help="the complete sweeps (slow)")
    bench.add_argument(
        "--device",
        type=training.checked_option(resolve_device),
        metavar="{cpu,cuda}",
        help="default: cuda when available",
    )
    bench.add_argument(
        "--threads",
        type=training.number_option(Bound(1)),
        help="CPU threads to pin (default 2, or FASTFORMER_BENCH_THREADS)",
    )
    train = commands.add_parser(
        "train",
        help="train the Seq2SeqTransformer on a synthetic digit task (torchrun for DDP)",
    )
    training.add_arguments(train)
    args = parser.parse_args(argv)

    if args.command == "info":
        _print_info(args.json)
        return 0
    if args.command == "train":
        try:  # what no single option can check: min_digits > max_digits, d_model % n_heads
            config = training.config_from_args(args)
        except ValueError as error:
            train.error(str(error))
        training.run_command(config)
        return 0
    unknown = sorted(set(args.ops or ()) - set(SUITES))
    if unknown:
        bench.error(f"argument --ops: unknown suites {unknown}; known: {sorted(SUITES)}")
    run(
        args.ops,
        args.dtype,
        Path(args.out),
        args.full,
        device=args.device,
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
