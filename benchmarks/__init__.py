"""fastformer's benchmarks: one shared harness (measure.py, harness.py, report.py), one
suite per op.

    from fastformer_benchmarks import run
    run(["layer_norm_residual"], dtype="bf16", full=False)

Results land in benchmarks/results/<device slug>.json (and .csv, .png) in a source checkout,
else in ./fastformer-bench-results; see README.md.
"""

from .runner import DEFAULT_OUT_DIR, SUITES, load_suite, run

__all__ = ["DEFAULT_OUT_DIR", "SUITES", "load_suite", "run"]
