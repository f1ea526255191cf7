"""A smoke run of the benchmark harness on tiny shapes: every provider runs or is recorded
as skipped, and the JSON, CSV and plot are written. Timings are not asserted."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from fastformer import reference
from tests.conftest import requires_extension

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture
def quick_settings(monkeypatch):
    """Tiny timing budgets and fixed device peaks for the runs of a test."""
    from fastformer_benchmarks import measure, runner

    monkeypatch.setattr(runner, "BUDGET_S", {False: 0.02, True: 0.02})
    monkeypatch.setattr(measure, "WARMUP_S", 0.01)
    monkeypatch.setattr(
        measure,
        "_measure_peaks",
        lambda device, dtypes: measure.DevicePeaks(
            copy_gbps=10.0,
            copy_bytes=1 << 20,
            matmul_tflops={"float32": 0.1},
            matmul_n=64,
            notes="smoke test: fixed peaks",
        ),
    )
    monkeypatch.setattr(measure, "_PEAKS", {})


@pytest.fixture
def quick_run(tmp_path, quick_settings):
    """run() of the named suite with quick_settings, into tmp_path; returns the JSON
    document and the suite's results."""
    from fastformer_benchmarks import run

    def quick(suite: str) -> tuple[dict, list[dict]]:
        # The harness collects garbage around every measurement; with torch and pytest
        # loaded each collection takes ~0.1 s. Frozen objects are skipped, keeping this short.
        gc.freeze()
        try:
            document = run([suite], None, tmp_path, False, device="cpu", threads=1)
        finally:
            gc.unfreeze()
        written = json.loads((tmp_path / f"{document['device']['slug']}.json").read_text())
        assert any(path.endswith(".csv") for path in document["files"])
        assert any(path.endswith(".png") for path in document["files"])
        return written, written["suites"][suite]["results"]

    return quick


@requires_extension
def test_layer_norm_suite_runs_end_to_end(quick_run, monkeypatch):
    from fastformer_benchmarks import bench_layer_norm_residual as suite

    monkeypatch.setattr(suite, "CPU_SHAPES", (64, (48, 96)))
    _, results = quick_run("layer_norm_residual")
    assert {(r["case"]["name"], r["case"]["mode"]) for r in results} == {
        (f"64x{h}", mode) for h in (48, 96) for mode in ("fwd", "fwd+bwd")
    }
    for result in results:
        by_provider = {m["provider"]: m for m in result["measurements"]}
        for provider in ("fastformer", "eager"):
            assert by_provider[provider]["status"] == "ok"
            assert by_provider[provider]["timing"]["median_ms"] > 0
        for provider in ("liger", "apex", "flash_attn"):  # CUDA only
            assert by_provider[provider]["status"].startswith("skipped")


@requires_extension
def test_finished_suites_are_saved_before_a_later_one_stops_the_run(
    tmp_path, monkeypatch, quick_settings
):
    """A run cut short (a time limit on a lent GPU) keeps the suites it finished: results are
    written after every suite."""
    import dataclasses

    from fastformer_benchmarks import bench_layer_norm_residual, run, runner

    monkeypatch.setattr(bench_layer_norm_residual, "CPU_SHAPES", (64, (48,)))

    def stopped(ctx):
        raise KeyboardInterrupt  # as a timeout's signal would stop the run

    real_load = runner.load_suite
    monkeypatch.setattr(
        runner,
        "load_suite",
        lambda name: (
            real_load(name)
            if name == "layer_norm_residual"
            else dataclasses.replace(real_load(name), cases=stopped)
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        run(["layer_norm_residual", "feed_forward"], None, tmp_path, False, device="cpu")
    (saved,) = tmp_path.glob("*.json")
    suites = json.loads(saved.read_text())["suites"]
    assert list(suites) == ["layer_norm_residual"]
    assert suites["layer_norm_residual"]["results"]
    assert list(tmp_path.glob("*.csv"))


def test_unknown_suite_is_named():
    from fastformer_benchmarks import load_suite

    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'"):
        load_suite("nope")


# ----------------------------------------------------------------------------------------
# `fastformer bench`: where results go, and bad options
# ----------------------------------------------------------------------------------------


def test_default_out_dir_is_the_checkouts_results_or_a_folder_here(tmp_path):
    """A source checkout writes benchmarks/results (the README's tables read them); an
    installed package never writes into site-packages."""
    from fastformer_benchmarks import DEFAULT_OUT_DIR
    from fastformer_benchmarks.runner import default_out_dir

    assert DEFAULT_OUT_DIR == REPOSITORY / "benchmarks" / "results"
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    assert default_out_dir(checkout / "benchmarks") == checkout / "benchmarks" / "results"
    installed = tmp_path / "site-packages" / "fastformer_benchmarks"
    installed.mkdir(parents=True)
    assert default_out_dir(installed) == Path("fastformer-bench-results")
    assert default_out_dir(tmp_path / "benchmarks") == Path("fastformer-bench-results")


def test_installed_bench_help_names_its_default(tmp_path):
    """A copy of the package outside the checkout, as pip installs it, imported first."""
    import shutil

    site = tmp_path / "site-packages"
    shutil.copytree(REPOSITORY / "benchmarks", site / "fastformer_benchmarks")
    script = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import fastformer_benchmarks; "
        "print(fastformer_benchmarks.__file__); "
        "from fastformer.__main__ import main; main(['bench', '--help'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site / "fastformer_benchmarks"))
    help_text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "(default: fastformer-bench-results, in the current folder)" in help_text
    checkout = subprocess.run(
        [sys.executable, "-m", "fastformer", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = f"(default: {REPOSITORY / 'benchmarks' / 'results'})"
    assert expected in " ".join(checkout.stdout.split())


def _bench_error(capsys, argv: list[str]) -> str:
    """The one-line error of `fastformer bench <argv>`, which must exit with code 2."""
    from fastformer.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", *argv])
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_command_rejects_bad_options(capsys, tmp_path):
    prefix = "fastformer bench: error: argument"
    error = _bench_error(capsys, ["--dtype", "int8"])
    assert error.startswith(f"{prefix} --dtype: unknown dtype 'int8'; one of [")
    assert "'bf16'" in error and "'float32'" in error
    taken = tmp_path / "taken"
    taken.write_text("")
    error = _bench_error(capsys, ["--out", str(taken)])
    assert error == f"{prefix} --out: output folder '{taken}' exists and is not a folder"
    error = _bench_error(capsys, ["--out", str(taken / "below")])
    assert error.startswith(f"{prefix} --out: output folder '{taken / 'below'}' cannot be")
    for threads in ("0", "-2", "two"):
        error = _bench_error(capsys, ["--threads", threads])
        assert error == f"{prefix} --threads: expected an integer >= 1, got {threads!r}"
    error = _bench_error(capsys, ["--device", "tpu"])
    assert error == f"{prefix} --device: expected cpu or cuda, got 'tpu'"
    error = _bench_error(capsys, ["--ops", "nope"])
    assert error.startswith(f"{prefix} --ops: unknown suites ['nope']; known: [")
    assert taken.read_text() == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_cuda_is_a_clean_error(capsys, tmp_path):
    """It was an AssertionError traceback from torch; run() itself says the same."""
    from fastformer_benchmarks import run

    error = _bench_error(capsys, ["--device", "cuda", "--out", str(tmp_path)])
    assert error.startswith(
        "fastformer bench: error: argument --device: no CUDA device is available for 'cuda'"
    )
    with pytest.raises(ValueError, match="no CUDA device is available"):
        run(["layer_norm_residual"], None, tmp_path, device="cuda")
    assert not list(tmp_path.iterdir())


def test_bench_threads_are_checked_not_replaced(monkeypatch):
    """0 or a negative count was silently replaced by the default or by 1."""
    from fastformer_benchmarks.runner import cpu_threads

    assert cpu_threads(1) == 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            cpu_threads(bad)
    monkeypatch.setenv("FASTFORMER_BENCH_THREADS", "lots")
    with pytest.raises(ValueError, match="FASTFORMER_BENCH_THREADS must be an integer >= 1"):
        cpu_threads(None)
    monkeypatch.setenv("FASTFORMER_BENCH_THREADS", "1")
    assert cpu_threads(None) == 1


@requires_extension
def test_attention_suite_runs_end_to_end(quick_run, monkeypatch):
    from fastformer_benchmarks import bench_attention as suite

    monkeypatch.setattr(suite, "CPU_SHAPES", suite.Shapes(64, 64, (32,), (16, 32)))
    # seqlen 32 stands for the long sequences where the O(L^2) providers are skipped.
    monkeypatch.setattr(suite, "QUADRATIC_MAX_SEQLEN", 16)
    monkeypatch.setattr(suite, "CPU_DECODE", suite.DecodeShapes((2,), 2, 32, (48,)))
    written, all_results = quick_run("attention")
    decode = [r for r in all_results if r["case"]["name"].endswith("decode")]
    results = [r for r in all_results if r not in decode]
    assert {(r["case"]["name"], r["case"]["mode"]) for r in results} == {
        (f"{64 // seqlen}x2x{seqlen}x32{causal}", mode)
        for seqlen in (16, 32)
        for causal in ("", " causal")
        for mode in ("fwd", "bwd", "fwd+bwd")
    }
    # Decoding: one query against 48 cached keys, measured in GB/s of q, k, v and out.
    (step,) = decode
    assert (step["case"]["name"], step["case"]["mode"]) == ("2x2x1x48x32 decode", "fwd")
    assert step["case"]["bytes"] == 2 * 2 * 32 * (2 * 48 + 2) * 4
    by_provider = {m["provider"]: m for m in step["measurements"]}
    for provider in ("fastformer", "sdpa", "sdpa-math", "eager"):
        assert by_provider[provider]["status"] == "ok", by_provider[provider]["reason"]
        assert by_provider[provider]["unit"] == "GB/s"
    flops = {(r["case"]["name"], r["case"]["mode"]): r["case"]["flops"] for r in results}
    assert flops["4x2x16x32", "fwd"] == 4 * 4 * 2 * 16 * 16 * 32
    assert flops["4x2x16x32 causal", "fwd"] * 2 == flops["4x2x16x32", "fwd"]
    assert flops["4x2x16x32", "fwd+bwd"] * 2 == flops["4x2x16x32", "fwd"] * 7
    for result in results:
        by_provider = {m["provider"]: m for m in result["measurements"]}
        long = result["case"]["params"]["seqlen"] > 16
        for provider in ("fastformer", "sdpa", "eager"):
            if provider == "eager" and long:
                assert by_provider[provider]["status"] == "skipped"
                assert "O(L^2) memory" in by_provider[provider]["reason"]
                continue
            assert by_provider[provider]["status"] == "ok"
            assert by_provider[provider]["timing"]["median_ms"] > 0
            assert by_provider[provider]["unit"] == "TFLOP/s"
        for provider in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "flash_attn"):
            assert by_provider[provider]["status"] == "skipped"
            assert by_provider[provider]["reason"]
        assert {m["status"] for m in by_provider.values()} <= {"ok", "skipped"}
    assert written["suites"]["attention"]["targets"] == []


@requires_extension
def test_attention_variants_suite_runs_end_to_end(quick_run, monkeypatch):
    """Causal ALiBi and soft-capping cases: fastformer runs; for ALiBi the baselines given
    the bias as a float mask run (eager not above the O(L^2) limit), for soft-capping eager
    only (SDPA cannot express it: skipped with the reason); CUDA-only ones are skipped. The
    baselines' mask and eager's cap compute what flash_attn_func does in its kernels."""
    from fastformer_benchmarks import bench_attention, bench_attention_variants

    import fastformer

    suite = bench_attention_variants
    monkeypatch.setattr(suite, "CPU_SHAPES", bench_attention.Shapes(64, 64, (32,), (16, 32)))
    monkeypatch.setattr(bench_attention, "QUADRATIC_MAX_SEQLEN", 16)
    _, results = quick_run("attention_variants")
    assert {(r["case"]["name"], r["case"]["mode"]) for r in results} == {
        (f"{64 // seqlen}x2x{seqlen}x32 causal {variant}", mode)
        for seqlen in (16, 32)
        for variant in ("alibi", "softcap")
        for mode in ("fwd", "fwd+bwd")
    }
    for result in results:
        by_provider = {m["provider"]: m for m in result["measurements"]}
        softcap = result["case"]["params"]["variant"] == "softcap"
        long = result["case"]["params"]["seqlen"] > 16
        for provider in ("fastformer", "sdpa", "sdpa-math", "eager"):
            reason = by_provider[provider]["reason"]
            if provider in ("sdpa", "sdpa-math") and softcap:
                assert "no logit soft-capping" in reason
            elif provider in ("sdpa-math", "eager") and long:
                assert "O(L^2) memory" in reason
            else:
                assert by_provider[provider]["status"] == "ok", reason
        for provider in ("flash_attn", "flex", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"):
            assert by_provider[provider]["status"] == "skipped"
            assert by_provider[provider]["reason"]

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, 16, 16, generator=generator) for _ in "qkv")
    case = next(c for c in results if c["case"]["params"]["variant"] == "softcap")["case"]
    case = bench_attention_variants.Case(
        **{**case, "params": {**case["params"], "seqlen": 16, "head_dim": 16}}
    )
    slopes = suite.alibi_slopes(8, q.device)
    expected = {
        "alibi": reference.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), suite.alibi_mask(slopes, 16, torch.float64)
        ),
        "softcap": bench_attention.eager_attention(case, q.device, softcap=suite.SOFTCAP)(
            q.double(), k.double(), v.double()
        ),
    }
    for variant, want in expected.items():
        options = suite._modification(variant, slopes)
        out = fastformer.flash_attn_func(
            *(t.transpose(1, 2) for t in (q, k, v)), causal=True, **options
        )
        torch.testing.assert_close(out.transpose(1, 2).double(), want, atol=1e-5, rtol=1e-5)


@requires_extension
def test_feed_forward_suite_runs_end_to_end(quick_run, monkeypatch):
    from fastformer_benchmarks import bench_feed_forward as suite

    monkeypatch.setattr(suite, "CPU_TOKENS", 64)
    monkeypatch.setattr(
        suite, "CPU_SHAPES", (suite.Shape(48, 96, "gelu"), suite.Shape(48, 80, "swiglu"))
    )
    written, results = quick_run("feed_forward")
    assert {(r["case"]["name"], r["case"]["mode"]) for r in results} == {
        (name, mode)
        for name in ("64x48->96 gelu", "64x48->80 swiglu")
        for mode in ("fwd", "fwd+bwd")
    }
    flops = {(r["case"]["name"], r["case"]["mode"]): r["case"]["flops"] for r in results}
    assert flops["64x48->96 gelu", "fwd"] == 2 * 64 * 48 * 96 * 2
    assert flops["64x48->80 swiglu", "fwd"] == 2 * 64 * 48 * 160 + 2 * 64 * 80 * 48
    assert flops["64x48->80 swiglu", "fwd+bwd"] == 3 * flops["64x48->80 swiglu", "fwd"]
    for result in results:
        by_provider = {m["provider"]: m for m in result["measurements"]}
        for provider in ("fastformer", "eager"):
            assert by_provider[provider]["status"] == "ok"
            assert by_provider[provider]["timing"]["median_ms"] > 0
            assert by_provider[provider]["unit"] == "TFLOP/s"
            # Activation memory is measured with a backward to come, and only then.
            saved = by_provider[provider]["activation_memory_bytes"]
            assert (saved is not None) == (result["case"]["mode"] == "fwd+bwd")
        assert by_provider["liger"]["status"] == "skipped"
        for path in ("separate", "cublaslt"):  # CUDA paths
            assert by_provider[f"fastformer ({path})"]["status"] == "skipped"
            assert "FASTFORMER_FF_EPILOGUE" in by_provider[f"fastformer ({path})"]["reason"]
        assert {m["status"] for m in by_provider.values()} <= {"ok", "skipped"}
        assert by_provider[suite.GEMMS_ALONE]["status"] == "ok"
    assert written["suites"]["feed_forward"]["bounds"] == [suite.GEMMS_ALONE]
    # The CPU targets name 2 threads and the 512 -> 2048 shape: undecided in this run.
    targets = written["suites"]["feed_forward"]["targets"]
    assert [t["target"] for t in targets] == [
        "forward+backward >= 1.05x eager",
        "forward+backward >= 90% of the matmul rate",
    ]
    assert all(t["passed"] is None for t in targets)


def _result(name: str, mode: str, ms: dict[str, float], saved: dict[str, int] | None = None):
    from fastformer_benchmarks.harness import Case, Measurement, Result
    from fastformer_benchmarks.measure import Timing

    measurements = []
    for provider, median in ms.items():
        m = Measurement(provider, "ok", timing=Timing(median, median, median, 5, "test"))
        m.activation_memory_bytes = (saved or {}).get(provider)
        measurements.append(m)
    return Result(Case("op", name, "bfloat16", mode, {"width": int(name)}), measurements)


def test_bounds_are_shown_as_shares_not_baselines():
    """A bound faster than the subject (as a floor is) gets its time and '% of' column, no
    'vs' column, and does not mark the subject slower."""
    from fastformer_benchmarks.measure import DevicePeaks
    from fastformer_benchmarks.report import SuiteRun, tabulate

    results = [_result("64", "fwd", {"fastformer": 10.0, "eager": 12.0, "floor": 8.0})]
    peaks = DevicePeaks(copy_gbps=1.0, copy_bytes=1, matmul_tflops={}, matmul_n=1, notes="")
    run = SuiteRun("op", "t", ["fastformer", "eager", "floor"], None, "", {}, peaks, results, [])
    run.bounds = ["floor"]
    headers, rows = tabulate(run)
    cells = dict(zip(headers, (cell.text for cell in rows[0]), strict=True))
    assert "vs floor" not in headers
    assert cells["vs eager"] == "1.20x"
    assert cells["floor ms"] == "8.000"
    assert cells["% of floor"] == "80%"
    assert cells[""] == ""  # no "<< slower than" mark


def test_geomean_and_activation_memory_targets():
    from fastformer_benchmarks.harness import Measurement, Target

    results = [
        _result("1", "fwd+bwd", {"fastformer": 1.0, "eager": 2.0}, {"fastformer": 4, "eager": 8}),
        _result("2", "fwd+bwd", {"fastformer": 2.0, "eager": 1.0}, {"fastformer": 8, "eager": 8}),
        _result("3", "fwd", {"fastformer": 1.0, "eager": 100.0}),
    ]
    geomean = Target("g", "geomean_speedup", 1.1, {"mode": "fwd+bwd"}, baseline="eager")
    [outcome] = geomean.evaluate(results, {})
    assert outcome.measured == pytest.approx(1.0)  # sqrt(2 * 0.5)
    assert outcome.passed is False
    assert outcome.case == "geometric mean of 2 cases"

    memory = Target("m", "activation_memory", 1.0, {"mode": "fwd+bwd"}, baseline="eager")
    assert [(o.measured, o.passed) for o in memory.evaluate(results, {})] == [
        (2.0, True),
        (1.0, True),
    ]

    # A case without a ratio leaves the mean undecided rather than computed over the rest.
    results[1].measurements[1] = Measurement("eager", "skipped", "not here")
    [outcome] = geomean.evaluate(results, {})
    assert outcome.passed is None
    assert "2 fwd+bwd" in outcome.detail
    never_slower = Target("n", "speedup", 1.0, {"width": [1, 2, 3]}, baseline="eager")
    assert [o.passed for o in never_slower.evaluate(results, {})] == [True, None, True]


@requires_extension
def test_transformer_suite_runs_end_to_end(quick_run, monkeypatch):
    from fastformer_benchmarks import bench_transformer as suite

    monkeypatch.setattr(suite, "CPU_MODEL", suite.Model(32, 2, 1, 48))
    monkeypatch.setattr(suite, "CPU_TOKENS", 46)
    monkeypatch.setattr(suite, "CPU_LENGTHS", (23,))  # batch 2, an odd length
    written, results = quick_run("transformer")
    assert {(r["case"]["name"], r["case"]["mode"]) for r in results} == {
        ("2x23 d32 1+1", mode) for mode in ("train", "infer")
    }
    for result in results:
        assert result["case"]["tokens"] == 2 * (23 + 23)  # batch x (src_len + tgt_len)
        by_provider = {m["provider"]: m for m in result["measurements"]}
        providers = ["fastformer", "eager", "fastformer (Seq2Seq)"]
        if by_provider["torch.compile"]["status"] == "ok":  # skipped without a C++ compiler
            providers.append("torch.compile")
        for provider in providers:
            m = by_provider[provider]
            assert m["status"] == "ok", m["reason"]
            assert m["timing"]["median_ms"] > 0
            assert m["unit"] == "tokens/s"
            assert m["share_of_peak"] is None
            if provider != "torch.compile":
                saved = m["activation_memory_bytes"]
                assert (saved is not None) == (result["case"]["mode"] == "train")
        assert {m["status"] for m in by_provider.values()} <= {"ok", "skipped"}
    # The CPU target names 2 threads and the d_model 256 model: undecided in this run.
    targets = written["suites"]["transformer"]["targets"]
    assert [t["target"] for t in targets] == ["training step >= 1.2x eager"]
    assert all(t["passed"] is None for t in targets)


def test_peak_memory_target():
    from fastformer_benchmarks.harness import Target

    results = [_result("1", "train", {"fastformer": 1.0, "eager": 1.0})]
    results[0].measurements[0].peak_memory_bytes = 50
    results[0].measurements[1].peak_memory_bytes = 100
    target = Target("p", "peak_memory", 1 / 0.6, {"mode": "train"}, baseline="eager")
    [outcome] = target.evaluate(results, {})
    assert outcome.measured == pytest.approx(2.0)  # eager's 100 over fastformer's 50
    assert outcome.passed is True
    results[0].measurements[0].peak_memory_bytes = 70  # 0.7x eager's
    assert target.evaluate(results, {})[0].passed is False


def _pytest_benchmarks(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m pytest benchmarks/ ...` in a fresh process, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=900,
    )


@requires_extension
def test_pytest_benchmark_smoke_every_suite(tmp_path):
    """Every default case x provider under pytest-benchmark, each step run once (timing
    disabled): a provider either runs or is skipped with its reason, none fails."""
    from fastformer_benchmarks import SUITES

    report = tmp_path / "junit.xml"
    done = _pytest_benchmarks("--benchmark-disable", "-rs", f"--junitxml={report}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    ran: dict[str, set[str]] = {suite: set() for suite in SUITES}
    for case in ElementTree.parse(report).iter("testcase"):
        suite, *_, provider = case.get("name").removesuffix("]").split("[", 1)[1].split("/")
        if case.find("skipped") is None:
            ran[suite].add(provider)
        else:  # skipped with the provider's reason, e.g. "liger_kernel not installed"
            message = case.find("skipped").get("message").replace(" ", "_")  # as in the ids
            assert message.removeprefix("Skipped:_").startswith(f"{provider}:_"), message
    for suite, providers in ran.items():
        assert "fastformer" in providers, f"{suite}: fastformer did not run"
        assert len(providers) >= 2, f"{suite}: no baseline ran"


@requires_extension
def test_pytest_benchmark_records_groups_and_throughput(tmp_path):
    out = tmp_path / "benchmarks.json"
    done = _pytest_benchmarks(
        "--bench-ops",
        "attention",
        "-k",
        "4x4x256x64/fwd/ and (fastformer or eager)",
        "--benchmark-max-time=0.02",
        "--benchmark-min-rounds=3",
        f"--benchmark-json={out}",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert {b["extra_info"]["provider"] for b in benchmarks} == {"fastformer", "eager"}
    for b in benchmarks:
        assert b["group"] == "attention 4x4x256x64 fwd float32"
        assert b["stats"]["rounds"] >= 3
        assert b["extra_info"]["unit"] == "TFLOP/s"
        # throughput = the case's FLOPs over pytest-benchmark's median
        flops = 4 * 4 * 4 * 256 * 256 * 64
        expected = flops / b["stats"]["median"] / 1e12
        assert b["extra_info"]["throughput"] == pytest.approx(expected, rel=1e-6)


def test_readme_results_come_from_the_results_files():
    """The README's result blocks are what `python -m fastformer_benchmarks.readme` writes
    from benchmarks/results/: rerun it after committing new results."""
    from fastformer_benchmarks import readme

    text = (REPOSITORY / "README.md").read_text()
    blocks = readme.BLOCK.findall(text)
    assert len(blocks) >= 4
    assert readme.render(text, REPOSITORY / "benchmarks" / "results", REPOSITORY) == text


def test_results_file_reads_back(tmp_path):
    """load_runs inverts write_json: the README's tables are built from what run() wrote."""
    from fastformer_benchmarks import report

    path = REPOSITORY / "benchmarks" / "results" / "cpu-amd-epyc-2t.json"
    device, runs = report.load_runs(path)
    _, document = report.write_json(tmp_path, device, list(runs.values()))
    _assert_same_record(json.loads(path.read_text())["suites"], document["suites"])


def _assert_same_record(original, written, where: str = "") -> None:
    """Equal, except that fields added to the schema after a suite last ran (absent from
    its record) read back as None."""
    if isinstance(original, dict):
        for key in written.keys() - original.keys():
            assert written[key] is None, f"{where}/{key}: {written[key]!r} from nothing"
        for key, value in original.items():
            _assert_same_record(value, written[key], f"{where}/{key}")
    elif isinstance(original, list):
        assert len(original) == len(written), where
        for index, (mine, theirs) in enumerate(zip(original, written, strict=True)):
            _assert_same_record(mine, theirs, f"{where}[{index}]")
    else:
        assert original == written, f"{where}: {original!r} != {written!r}"
