"""Which attention tile wins where: a summary of Triton's autotuning results, for tuning the
tile tables of kernels/attention.py from one GPU run.

    TRITON_CACHE_AUTOTUNING=1 python -m fastformer bench --ops attention   # on the GPU
    python tools/autotune_report.py DIR [--csv tiles.csv]

With TRITON_CACHE_AUTOTUNING=1, Triton's autotuner keeps every tuning it does in its cache
directory: one `<kernel>.autotune.json` per kernel and tuning key, with the median (and 20th
and 80th percentile) time of every tile it tried. `tools/gpu_checks.sh tune` runs the
attention benchmark so and copies those files into its output folder; this reads them
(DIR is searched recursively) and prints, for each kernel, every tile's

- wins: the tuning keys (head dims, length buckets, mask and band flags, dtypes) where it
  was the fastest, of the keys where it was tried;
- vs best: the geometric mean, over those keys, of its time over the fastest tile's
  (1.00 where it always wins; inf where it failed to compile or run there);

so the tables can drop the tiles that never win and order the rest by their wins (with
FASTFORMER_AUTOTUNE=0 the first tile that fits runs untimed). --csv writes one row per
(kernel, key, tile) with the key's fields named.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastformer_kernels.attention import FWD_TUNING_KEY, TUNING_KEY
from rich.console import Console
from rich.table import Table

# The autotuned kernels and the names of their tuning keys; Triton appends the dtype of every
# tensor argument.
KEY_NAMES = {
    "_attention_fwd_kernel": FWD_TUNING_KEY,
    "_attention_bwd_dkdv_kernel": TUNING_KEY,
    "_attention_bwd_dq_kernel": TUNING_KEY,
}
SUFFIX = ".autotune.json"


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Tuning:
    """One tuning: a kernel at one key, with each tried tile's median time in ms."""

    kernel: str
    key: tuple
    median_ms: dict[Tile, float]

    @property
    def best(self) -> Tile:
        return min(self.median_ms, key=self.median_ms.__getitem__)

    def key_fields(self) -> dict[str, object]:
        """The key by name: the kernel's tuning-key names, then dtype0, dtype1... for the
        dtypes Triton appends."""
        names = KEY_NAMES[self.kernel]
        return {
            names[index] if index < len(names) else f"dtype{index - len(names)}": value
            for index, value in enumerate(self.key)
        }


def _tile(config: dict) -> Tile:
    kwargs = config.get("kwargs", {})
    return Tile(kwargs["BLOCK_M"], kwargs["BLOCK_N"], config["num_warps"], config["num_stages"])


def _median(timings: float | Sequence[float]) -> float:
    """Triton stores do_bench's (median, p20, p80), or one float where quantiles are off;
    a tile that failed to compile or ran out of resources is stored as inf."""
    return float(timings if isinstance(timings, (int, float)) else timings[0])


def read_tunings(paths: Iterable[Path]) -> list[Tuning]:
    """The tunings of the attention kernels (KEY_NAMES) in these files; a tuning where no
    tile ran (every time inf) says nothing about the tiles and is left out."""
    tunings = []
    for path in paths:
        kernel = path.name.removesuffix(SUFFIX)
        if kernel not in KEY_NAMES:
            continue
        data = json.loads(path.read_text())
        times = {_tile(config): _median(timings) for config, timings in data["configs_timings"]}
        if times and math.isfinite(min(times.values())):
            tunings.append(Tuning(kernel, tuple(data["key"]), times))
    return sorted(tunings, key=lambda t: (t.kernel, [str(k) for k in t.key]))


@dataclass
class TileSummary:
    tile: Tile
    tried: int = 0
    wins: int = 0
    log_ratio_sum: float = 0.0  # sum over keys of log(time / best time)

    @property
    def vs_best(self) -> float:
        return math.exp(self.log_ratio_sum / self.tried) if self.tried else math.nan


def summarize(tunings: Sequence[Tuning]) -> dict[str, list[TileSummary]]:
    """Per kernel, each tile's summary, most wins first (then closest to the best)."""
    by_kernel: dict[str, dict[Tile, TileSummary]] = defaultdict(dict)
    for tuning in tunings:
        best_ms = tuning.median_ms[tuning.best]
        for tile, ms in tuning.median_ms.items():
            summary = by_kernel[tuning.kernel].setdefault(tile, TileSummary(tile))
            summary.tried += 1
            summary.wins += tile == tuning.best
            summary.log_ratio_sum += math.log(ms / best_ms)  # inf where the tile failed
    return {
        kernel: sorted(tiles.values(), key=lambda s: (-s.wins, s.vs_best))
        for kernel, tiles in sorted(by_kernel.items())
    }


def print_summary(summaries: dict[str, list[TileSummary]], tunings: Sequence[Tuning]) -> None:
    console = Console(width=100)
    for kernel, tiles in summaries.items():
        keys = sum(tuning.kernel == kernel for tuning in tunings)
        console.print(f"{kernel}: {keys} tuning keys")
        table = Table()
        table.add_column("tile")
        table.add_column("wins", justify="right")
        table.add_column("vs best", justify="right")
        for summary in tiles:
            table.add_row(
                str(summary.tile), f"{summary.wins}/{summary.tried}", f"{summary.vs_best:.2f}"
            )
        console.print(table)


def write_csv(path: Path, tunings: Sequence[Tuning]) -> None:
    key_names = list(dict.fromkeys(name for t in tunings for name in t.key_fields()))
    tile_fields = [field.name for field in fields(Tile)]
    columns = ["kernel", *key_names, "tile", *tile_fields, "median_ms", "vs_best", "best"]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        for tuning in tunings:
            best_ms = tuning.median_ms[tuning.best]
            for tile, ms in sorted(tuning.median_ms.items(), key=lambda item: item[1]):
                row = {"kernel": tuning.kernel, **tuning.key_fields(), "tile": str(tile)}
                row |= asdict(tile)
                row |= {"median_ms": ms, "vs_best": ms / best_ms, "best": tile == tuning.best}
                writer.writerow(row)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="searched recursively for *.autotune.json")
    parser.add_argument("--csv", type=Path, help="one row per (kernel, key, tile)")
    args = parser.parse_args(argv)
    paths = sorted(args.directory.rglob(f"*{SUFFIX}"))
    tunings = read_tunings(paths)
    if not tunings:
        print(f"no attention tunings (*{SUFFIX}) under {args.directory}", file=sys.stderr)
        return 1
    print_summary(summarize(tunings), tunings)
    if args.csv is not None:
        write_csv(args.csv, tunings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
