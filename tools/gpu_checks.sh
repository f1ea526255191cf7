#!/usr/bin/env bash
# What a session with a GPU owes, in stages that each fit one device call (10 minutes):
#
#   tools/gpu_checks.sh build      install with the machine's CUDA torch (nvcc builds csrc/cuda)
#   tools/gpu_checks.sh test       the whole suite on CUDA (fp16/bf16/fp32), both feed-forward paths
#   tools/gpu_checks.sh sanitize   compute-sanitizer memcheck and racecheck on tools/sanitize_cases.py
#   tools/gpu_checks.sh large      tensors over 2^31 elements (FASTFORMER_TEST_LARGE=1)
#   tools/gpu_checks.sh bench      `fastformer bench` (default run; results in benchmarks/results)
#   tools/gpu_checks.sh core       the op, module and model tests on CUDA (no fuzzing), bounded
#   tools/gpu_checks.sh tune       the attention benchmark with every tuning kept: each tile's time
#                                  at each tuning key, summarised by tools/autotune_report.py
#   tools/gpu_checks.sh all        build, core and bench in one call, each step time-bounded:
#                                  what to run first where device time is short
#
# Logs go to $OUT (the device tool's output folder) or /tmp/fastformer-gpu. BUILD_S, CORE_S
# and BENCH_S bound those stages (BENCH_S the tune stage too; seconds; 0, the default, is no
# bound); the benchmark writes its results after every suite and Triton each tuning as it
# ends, so a bounded run keeps what it finished. TUNE_FULL=1: tune over the --full sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/fastformer-gpu}"
mkdir -p "$out"

case "${1:-}" in
build)
	MAX_JOBS="${MAX_JOBS:-16}" timeout "${BUILD_S:-0}" pip install --no-build-isolation --no-deps -e . \
		>"$out/build.log" 2>&1
	status=$?
	tail -20 "$out/build.log"
	python -m fastformer info | tee "$out/info.txt"
	exit $status
	;;
test)
	# One attention tile per launch (FASTFORMER_AUTOTUNE=0): the suite's many shapes each
	# compile once instead of timing every tile; the benchmarks autotune. The compile-only
	# checks of CPU CI (nvcc, Triton cross-compilation) have nothing to add here.
	export FASTFORMER_AUTOTUNE="${FASTFORMER_AUTOTUNE:-0}"
	python -m pytest -q -p no:cacheprovider --junitxml="$out/junit.xml" \
		--ignore=tests/test_cuda_sources.py --ignore=tests/test_cross_compile.py \
		2>&1 | tee "$out/test.log" | tail -40
	# The cuBLASLt epilogues again, with the NaN/Inf propagation cases (whether the ReLU
	# epilogue keeps a NaN is not documented) and the large-magnitude ones.
	FASTFORMER_FF_EPILOGUE=cublaslt python -m pytest -q -p no:cacheprovider tests/test_feed_forward.py \
		tests/test_numerics.py -k "feed_forward" 2>&1 | tee "$out/test-cublaslt.log" | tail -10
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
	/usr/bin/time -v timeout "${BENCH_S:-0}" python -m fastformer bench --out "$out/results" 2>&1 |
		tee "$out/bench.log" | tail -60
	;;
core)
	export FASTFORMER_AUTOTUNE="${FASTFORMER_AUTOTUNE:-0}"
	timeout "${CORE_S:-0}" python -m pytest -q -p no:cacheprovider --junitxml="$out/core.xml" \
		tests/test_attention.py tests/test_layer_norm_residual.py tests/test_feed_forward.py \
		tests/test_nn.py tests/test_nn_transformer.py tests/test_models.py \
		2>&1 | tee "$out/core.log" | tail -30
	;;
tune)
	# Triton keeps each autotuning (every tried tile's times) in its cache directory as
	# <kernel>.autotune.json when TRITON_CACHE_AUTOTUNING=1; the records, not the compiled
	# kernels beside them, are copied to $out/autotune (one folder per record, as in the cache).
	cache="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
	TRITON_CACHE_AUTOTUNING=1 FASTFORMER_AUTOTUNE=1 timeout "${BENCH_S:-0}" python -m fastformer bench \
		--ops attention ${TUNE_FULL:+--full} --out "$out/tune-results" 2>&1 | tee "$out/tune.log" | tail -40
	find "$cache" -name '*.autotune.json' 2>/dev/null | while read -r record; do
		folder="$out/autotune/$(basename "$(dirname "$record")")"
		mkdir -p "$folder" && cp "$record" "$folder/"
	done
	python tools/autotune_report.py "$out/autotune" --csv "$out/autotune.csv" | tee "$out/autotune.txt"
	;;
all)
	# At most ALL_S seconds (default 570: one device call of 10 minutes). The build gets up
	# to 240 s (nothing else can run without it), the tests up to 150 s while leaving the
	# benchmark at least 200 s, and the benchmark whatever is left.
	end=$((SECONDS + ${ALL_S:-570}))
	BUILD_S=240 "$0" build || exit 1
	core_s=$((end - SECONDS - 200))
	((core_s > 150)) && core_s=150
	((core_s > 0)) && CORE_S=$core_s "$0" core
	bench_s=$((end - SECONDS))
	((bench_s < 1)) && bench_s=1 # 0 would mean no bound
	BENCH_S=$bench_s "$0" bench
	;;
*)
	sed -n '2,18p' "$0"
	exit 2
	;;
esac
