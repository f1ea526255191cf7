"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one.

CPU CI runs the kernels through Triton's interpreter, which never lowers them; this test runs
the real compiler (tools/cross_compile.py, its "ci" set: each kernel's main variants, the
largest tile of each autotuned launch) and requires every kernel to compile and every launch
to have a tile within the GPU's shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "cross_compile.py"


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton without its NVIDIA backend")
def test_triton_kernels_compile_for_hopper(tmp_path: Path) -> None:
    report = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(TOOL), "--set", "ci", "--arch", "90", "--json", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    compiled = json.loads(report.read_text())["results"]["sm_90"]
    kernels = {entry["kernel"] for entry in compiled}
    assert kernels == {
        "_attention_fwd_kernel",
        "_attention_fwd_combine_kernel",
        "_attention_bwd_preprocess_kernel",
        "_attention_bwd_dkdv_kernel",
        "_attention_bwd_dq_kernel",
        "_layer_norm_residual_fwd_kernel",
        "_layer_norm_residual_bwd_kernel",
    }
    # Half-precision attention tiles of 64 rows and more use Hopper's warpgroup MMA.
    forward_half = [
        e
        for e in compiled
        if e["kernel"] == "_attention_fwd_kernel"
        and "fp32" not in e["case"]
        and e["config"]["BLOCK_M"] >= 64
    ]
    assert forward_half and all(e["mma"] == "wgmma" for e in forward_half), forward_half
