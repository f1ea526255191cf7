"""fastformer.info(), `python -m fastformer info`, and choosing the CPU implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import fastformer
from tests.conftest import requires_extension


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_info_reports_versions_device_and_status():
    info = fastformer.info()
    assert info["versions"]["torch"] == torch.__version__
    assert info["device"].startswith(("cpu:", "cuda:"))
    assert isinstance(info["extension"]["available"], bool)
    assert set(info["ops"]["layer_norm_residual"]) >= {"cpu"}


@requires_extension
def test_info_names_the_cpu_implementation():
    by_dtype = fastformer.info()["ops"]["layer_norm_residual"]["cpu"]
    assert by_dtype == {dtype: "c++" for dtype in ("float32", "float16", "bfloat16", "float64")}
    if not fastformer.backend.triton_interpreter_enabled():
        return  # with a GPU the tests run without the interpreter
    with fastformer.triton_on_cpu():
        by_dtype = fastformer.info()["ops"]["layer_norm_residual"]["cpu"]
    assert by_dtype["float32"] == "triton (interpreter)"
    assert by_dtype["float64"] == "torch (fallback)"  # no Triton kernel for float64


def test_command_line_info_as_json():
    result = subprocess.run(
        [sys.executable, "-m", "fastformer", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "layer_norm_residual" in json.loads(result.stdout)["ops"]


def test_command_line_info_table():
    result = subprocess.run(
        [sys.executable, "-m", "fastformer", "info"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "layer_norm_residual" in result.stdout
    assert f"torch {torch.__version__}" in result.stdout


@requires_extension
def test_cpu_backend_chosen_by_environment():
    report = "import fastformer, json; print(json.dumps(fastformer.info()['ops']))"
    result = _python(report, TRITON_INTERPRET="1", FASTFORMER_CPU_BACKEND="triton")
    assert result.returncode == 0, result.stderr
    cpu = json.loads(result.stdout)["layer_norm_residual"]["cpu"]
    assert cpu["float16"] == "triton (interpreter)"

    without_interpreter = _python(
        "import fastformer", TRITON_INTERPRET="0", FASTFORMER_CPU_BACKEND="triton"
    )
    assert without_interpreter.returncode != 0
    assert "set TRITON_INTERPRET=1" in without_interpreter.stderr

    unknown = _python("import fastformer", FASTFORMER_CPU_BACKEND="gpu")
    assert "FASTFORMER_CPU_BACKEND must be 'cpp' or 'triton'" in unknown.stderr


@requires_extension
def test_info_names_the_cpu_gemm_library():
    """FASTFORMER_CPU_GEMM or, unset, the CPU's maker picks it; a bad value is reported, not
    raised (the feed-forward itself raises on it)."""
    code = "import fastformer; print(fastformer.info()['cpu_gemm'])"
    assert _python(code).stdout.strip() in ("mkl", "onednn")
    assert _python(code, FASTFORMER_CPU_GEMM="mkl").stdout.strip() == "mkl"
    onednn = "onednn" if torch.backends.mkldnn.is_available() else "mkl"  # else unavailable
    assert _python(code, FASTFORMER_CPU_GEMM="onednn").stdout.strip() == onednn
    reported = _python(code, FASTFORMER_CPU_GEMM="blis").stdout.strip()
    assert reported.startswith("error:") and "FASTFORMER_CPU_GEMM" in reported
    table = _python("import sys; from fastformer.__main__ import main; main(['info'])")
    assert "CPU feed-forward GEMMs (x @ W.T):" in table.stdout


_PRUNED_TILES = """
import json, torch
from fastformer_kernels.attention import _attention_fwd_kernel as kernel
shape = dict(L_BUCKET=4096, S_BUCKET=4096, BLOCK_D=64, BLOCK_DV=64)
q = torch.empty(1, dtype=torch.bfloat16)
tiles = kernel.early_config_prune(kernel.configs, {"Q": q}, **shape)
print(json.dumps([[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]] for c in tiles]))
"""


def test_autotune_setting_limits_the_tiles_timed():
    """FASTFORMER_AUTOTUNE=0 leaves one tile per launch (the first that fits), so nothing is
    timed; unset or 1 times every tile that fits. Checked on the pruning the GPU autotuner
    runs (compiled mode: without the interpreter), and reported by info()."""
    compiled = {"TRITON_INTERPRET": "0"}
    every = _python(_PRUNED_TILES, **compiled)
    assert every.returncode == 0, every.stderr
    every_tile = json.loads(every.stdout)
    assert len(every_tile) > 1 and every_tile[0] == [128, 128]
    one = _python(_PRUNED_TILES, FASTFORMER_AUTOTUNE="0", **compiled)
    assert json.loads(one.stdout) == every_tile[:1]
    bad = _python(_PRUNED_TILES, FASTFORMER_AUTOTUNE="fast", **compiled)
    assert bad.returncode != 0 and "FASTFORMER_AUTOTUNE must be '0' or '1'" in bad.stderr

    code = "import fastformer; print(fastformer.info()['triton']['autotune'])"
    assert _python(code).stdout.strip() == "True"
    assert _python(code, FASTFORMER_AUTOTUNE="0").stdout.strip() == "False"
    assert _python(code, FASTFORMER_AUTOTUNE="fast").stdout.strip().startswith("error:")
