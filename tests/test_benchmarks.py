"""A smoke run of the benchmark harness on tiny shapes: every provider runs or is recorded
as skipped, and the JSON, CSV and plot are written. Timings are not asserted."""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_extension


@requires_extension
def test_layer_norm_suite_runs_end_to_end(tmp_path, monkeypatch):
    from fastformer_benchmarks import bench_layer_norm_residual as suite
    from fastformer_benchmarks import harness, run, runner

    monkeypatch.setattr(suite, "CPU_SHAPES", (64, (48, 96)))
    monkeypatch.setattr(runner, "BUDGET_S", {False: 0.05, True: 0.05})
    monkeypatch.setattr(
        harness,
        "_measure_peaks",
        lambda device: harness.DevicePeaks(
            copy_gbps=10.0,
            copy_bytes=1 << 20,
            matmul_tflops={"float32": 0.1},
            matmul_n=64,
            notes="smoke test: fixed peaks",
        ),
    )
    monkeypatch.setattr(harness, "_PEAKS", {})

    document = run(["layer_norm_residual"], None, tmp_path, False, device="cpu", threads=1)

    written = json.loads((tmp_path / f"{document['device']['slug']}.json").read_text())
    results = written["suites"]["layer_norm_residual"]["results"]
    assert {(r["case"]["name"], r["case"]["mode"]) for r in results} == {
        (f"64x{h}", mode) for h in (48, 96) for mode in ("fwd", "fwd+bwd")
    }
    for result in results:
        by_provider = {m["provider"]: m for m in result["measurements"]}
        for provider in ("fastformer", "eager"):
            assert by_provider[provider]["status"] == "ok"
            assert by_provider[provider]["timing"]["median_ms"] > 0
        assert by_provider["liger"]["status"].startswith("skipped")
    assert any(path.endswith(".csv") for path in document["files"])
    assert any(path.endswith(".png") for path in document["files"])


def test_unknown_suite_is_named():
    from fastformer_benchmarks import load_suite

    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'"):
        load_suite("nope")
