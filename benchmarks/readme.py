"""The README's result blocks, written from the committed results files.

A block in a Markdown file

    <!-- results: cpu-amd-epyc-2t feed_forward -->
    ...
    <!-- end results -->

is replaced by that suite's table from results/cpu-amd-epyc-2t.json (the same table
`fastformer bench` prints), its device, date and settings, the measured peaks, the targets'
outcomes and its plot, so that every figure the README shows comes from a results file.

    python -m fastformer_benchmarks.readme            # rewrite README.md's blocks
    python -m fastformer_benchmarks.readme --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import report
from .runner import DEFAULT_OUT_DIR

BLOCK = re.compile(
    r"(?P<open><!-- results: (?P<slug>[\w.-]+) (?P<suite>\w+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- end results -->)",
    re.S,
)
DEFAULT_README = Path(__file__).resolve().parent.parent / "README.md"


def render_block(slug: str, suite: str, results_dir: Path, relative_to: Path) -> str:
    """The Markdown of one suite's latest results on one device."""
    path = results_dir / f"{slug}.json"
    device, runs = report.load_runs(path)
    if suite not in runs:
        raise KeyError(f"{path} has no results for suite {suite!r}; it has {sorted(runs)}")
    run = runs[suite]
    link = Path(os.path.relpath(path, relative_to)).as_posix()
    settings = run.settings
    lines = [
        f"{report.title(run, device)}; {run.date[:16].replace('T', ' ')}, "
        f"torch {device.torch}, from [{link}]({link}) "
        f"({'--full' if settings.get('full') else 'default'} run"
        + (f", {settings['duration_s']:.0f} s" if "duration_s" in settings else "")
        + "). Median ms per call; "
        f"`vs X` is X's time over {run.providers[0]}'s"
        + (
            f"; `% of X` the same ratio for a floor X ({', '.join(run.bounds)}: part of "
            f"{run.providers[0]}'s work alone, not a competitor)."
            if run.bounds
            else "."
        ),
        "",
        report.markdown_table(run),
        "",
        *(f"- {line.text}" for line in report.notes(run)),
    ]
    for dtype in sorted({r.case.dtype for r in run.results}):
        plot = results_dir / f"{slug}-{suite}-{dtype}.png"
        if plot.exists():
            plot_link = Path(os.path.relpath(plot, relative_to)).as_posix()
            lines += ["", f"![{run.title}, {device.name}, {dtype}]({plot_link})"]
    return "\n".join(lines) + "\n"


def render(markdown: str, results_dir: Path, relative_to: Path) -> str:
    """`markdown` with every results block rewritten from `results_dir`."""

    def replace(match: re.Match[str]) -> str:
        body = render_block(match["slug"], match["suite"], results_dir, relative_to)
        return match["open"] + body + match["close"]

    return BLOCK.sub(replace, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastformer_benchmarks.readme", description=__doc__.split("\n")[0]
    )
    parser.add_argument("readme", nargs="?", type=Path, default=DEFAULT_README)
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--check", action="store_true", help="exit 1 if out of date")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    updated = render(text, args.results, args.readme.resolve().parent)
    if args.check:
        if updated != text:
            print(f"{args.readme}: results blocks are out of date; run without --check")
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
