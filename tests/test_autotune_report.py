"""tools/autotune_report.py on autotuning records written as Triton writes them
(Autotuner.check_disk_cache: {"key": tuning key, "configs_timings": [(Config.__dict__,
[median, p20, p80]), ...]} in <kernel>.autotune.json), since only a GPU produces real ones."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "autotune_report.py"
_spec = importlib.util.spec_from_file_location("autotune_report", _TOOL)
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report  # dataclasses look their module up there
_spec.loader.exec_module(report)


def _key(names: list[str], dtypes: list[str], **values: object) -> list:
    """A tuning key as Triton stores it: the values of the named arguments (False for the
    feature flags not given), then the dtypes it appends (one per tensor argument)."""
    return [values.get(name, False) for name in names] + dtypes


# A bf16 head-dim-128 key at long lengths, no mask or band, unsplit (two dtypes shown).
_LONG = dict(BLOCK_D=128, BLOCK_DV=128, L_BUCKET=4096, S_BUCKET=4096)
_FWD_KEY = _key(report.FWD_TUNING_KEY, ["torch.bfloat16", "torch.int64"], **_LONG, SPLIT=1)
_BWD_KEY = _key(report.TUNING_KEY, ["torch.bfloat16"], **_LONG)


def _config(block_m: int, block_n: int, warps: int, stages: int) -> dict:
    config = triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages
    )
    return config.__dict__


def _write(directory: Path, kernel: str, key: list, timings: list[tuple[tuple, list]]) -> None:
    """One record as Triton stores it: a cache subdirectory per key hash."""
    subdirectory = directory / f"hash{len(list(directory.iterdir()))}"
    subdirectory.mkdir()
    record = {"key": key, "configs_timings": [(_config(*tile), t) for tile, t in timings]}
    (subdirectory / f"{kernel}.autotune.json").write_text(json.dumps(record))


@pytest.fixture
def records(tmp_path: Path) -> Path:
    big, small, narrow = (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)
    _write(
        tmp_path,
        "_attention_fwd_kernel",
        _FWD_KEY,
        [(big, [1.0, 0.9, 1.1]), (small, [2.0, 1.9, 2.1]), (narrow, [4.0, 3.9, 4.1])],
    )
    other_key = _key(
        report.FWD_TUNING_KEY,
        ["torch.float16", "torch.int64"],
        BLOCK_D=64,
        BLOCK_DV=64,
        L_BUCKET=1024,
        S_BUCKET=1024,
        HAS_MASK=True,
        MASK_IS_BOOL=True,
        BAND_RIGHT=True,
        SPLIT=1,
    )
    _write(
        tmp_path,
        "_attention_fwd_kernel",
        other_key,
        [(big, [3.0, 2.9, 3.1]), (small, [1.5, 1.4, 1.6]), (narrow, [float("inf")] * 3)],
    )
    _write(
        tmp_path,
        "_attention_bwd_dq_kernel",
        _BWD_KEY,
        [(small, [0.5, 0.4, 0.6]), (big, [0.75, 0.7, 0.8])],
    )
    # Not an attention kernel, and a tuning where nothing ran: both left out.
    _write(tmp_path, "_other_kernel", [1], [(big, [1.0, 1.0, 1.0]), (small, [2.0, 2.0, 2.0])])
    _write(
        tmp_path,
        "_attention_bwd_dkdv_kernel",
        _BWD_KEY,
        [(big, [float("inf")] * 3), (small, [float("inf")] * 3)],
    )
    return tmp_path


def test_reads_every_attention_tuning(records: Path) -> None:
    tunings = report.read_tunings(sorted(records.rglob("*.autotune.json")))
    assert sorted(t.kernel for t in tunings) == [
        "_attention_bwd_dq_kernel",
        "_attention_fwd_kernel",
        "_attention_fwd_kernel",
    ]
    fwd = next(t for t in tunings if t.kernel == "_attention_fwd_kernel" and t.key[0] == 128)
    assert fwd.best == report.Tile(128, 128, 8, 2)
    fields = fwd.key_fields()
    assert fields["BLOCK_D"] == 128 and fields["SPLIT"] == 1
    assert fields["dtype0"] == "torch.bfloat16" and fields["dtype1"] == "torch.int64"


def test_summary_counts_wins_and_distance_from_best(records: Path) -> None:
    tunings = report.read_tunings(sorted(records.rglob("*.autotune.json")))
    fwd = {s.tile: s for s in report.summarize(tunings)["_attention_fwd_kernel"]}
    big, small, narrow = (
        report.Tile(128, 128, 8, 2),
        report.Tile(64, 64, 4, 3),
        report.Tile(128, 64, 4, 3),
    )
    assert (fwd[big].wins, fwd[big].tried) == (1, 2)
    assert (fwd[small].wins, fwd[small].tried) == (1, 2)
    assert fwd[narrow].wins == 0
    # Geometric means of time over the best: big 1 and 2, small 2 and 1.
    assert fwd[big].vs_best == pytest.approx(math.sqrt(2))
    assert fwd[small].vs_best == pytest.approx(math.sqrt(2))
    assert fwd[narrow].vs_best == math.inf  # it failed at one key


def test_cli_prints_the_table_and_writes_the_csv(records: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiles.csv"
    assert report.main([str(records), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "_attention_fwd_kernel: 2 tuning keys" in printed
    assert "_attention_bwd_dq_kernel: 1 tuning keys" in printed
    assert "_other_kernel" not in printed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 + 3 + 2
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 3 and all(float(r["vs_best"]) == 1.0 for r in best)
    dq = [r for r in rows if r["kernel"] == "_attention_bwd_dq_kernel"]
    assert {r["tile"] for r in dq} == {"64x64 w4 s3", "128x128 w8 s2"}
    assert all(r["L_BUCKET"] == "4096" and r["dtype0"] == "torch.bfloat16" for r in dq)


def test_cli_fails_where_there_is_nothing(tmp_path: Path) -> None:
    assert report.main([str(tmp_path)]) == 1
