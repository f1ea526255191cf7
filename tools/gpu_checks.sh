#!/usr/bin/env bash
# What a session with a GPU owes, in stages that each fit one device call (10 minutes):
#
#   tools/gpu_checks.sh build      install with the machine's CUDA torch (nvcc builds csrc/cuda)
#   tools/gpu_checks.sh test       the whole suite on CUDA (fp16/bf16/fp32), both feed-forward paths
#   tools/gpu_checks.sh sanitize   compute-sanitizer memcheck and racecheck on tools/sanitize_cases.py
#   tools/gpu_checks.sh large      tensors over 2^31 elements (FASTFORMER_TEST_LARGE=1)
#   tools/gpu_checks.sh bench      `fastformer bench` (default run; results in benchmarks/results)
#
# Logs go to $OUT (the device tool's output folder) or /tmp/fastformer-gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/fastformer-gpu}"
mkdir -p "$out"

case "${1:-}" in
build)
	MAX_JOBS="${MAX_JOBS:-16}" pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
	status=$?
	tail -20 "$out/build.log"
	python -m fastformer info | tee "$out/info.txt"
	exit $status
	;;
test)
	# One attention tile per launch (FASTFORMER_AUTOTUNE=0): the suite's many shapes each
	# compile once instead of timing every tile; the benchmarks autotune.
	export FASTFORMER_AUTOTUNE="${FASTFORMER_AUTOTUNE:-0}"
	python -m pytest -q -p no:cacheprovider --junitxml="$out/junit.xml" 2>&1 | tee "$out/test.log" | tail -40
	FASTFORMER_FF_EPILOGUE=cublaslt python -m pytest -q -p no:cacheprovider tests/test_feed_forward.py \
		2>&1 | tee "$out/test-cublaslt.log" | tail -10
	;;
sanitize)
	for tool in memcheck racecheck; do
		compute-sanitizer --tool "$tool" --error-exitcode 1 python tools/sanitize_cases.py \
			>"$out/sanitize-$tool.log" 2>&1
		echo "$tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$out/sanitize-$tool.log") clean summaries)"
		tail -5 "$out/sanitize-$tool.log"
	done
	;;
large)
	FASTFORMER_TEST_LARGE=1 python -m pytest -q -p no:cacheprovider tests/test_robustness.py -k "2_31 or 65535" \
		2>&1 | tee "$out/large.log" | tail -10
	;;
bench)
	/usr/bin/time -v python -m fastformer bench --out "$out/results" 2>&1 | tee "$out/bench.log" | tail -60
	;;
*)
	sed -n '2,10p' "$0"
	exit 2
	;;
esac
