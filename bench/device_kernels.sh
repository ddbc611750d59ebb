#!/usr/bin/env bash
# The GPU machine's kernel run in one go: install, the cuda test lane, then bench/kernels.py.
#   bench/device_kernels.sh [bench/kernels.py args, e.g. --quick --only attention]
# Run from the repo root. Wheels the image lacks may come in .whl/ (installed into /tmp/site).
# Results go to $OUT (default ./bench_out): cuda_lane.log, kernels.json, kernels.txt, kernels.err.
# Printed last: the cuda lane's summary line, then the kernel table.

# No -e: a failing test lane must not stop the benchmark; pipefail so each pipeline's status is
# the test run's or the benchmark's, not tee's.
set -uo pipefail

OUT="${OUT:-$PWD/bench_out}"
export OUT
mkdir -p "$OUT"

source bench/device_install.sh

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv

# RUN_LANE=0 / RUN_SWEEP=1 / RUN_BENCH=0 pick the parts (default: lane and benchmark).
lane_rc=0
if [ "${RUN_LANE:-1}" = 1 ]; then
  echo "== cuda lane"
  # Test processes in parallel when pytest-xdist is there: most of the lane's time is Triton
  # compiling each kernel variant on the CPU, and the GPU work of each test is small.
  parallel=()
  python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
  python3 -m pytest -q -rfE "${parallel[@]}" -m cuda tests/kernels tests/test_cuda.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/cuda_lane.log" | grep -vE '^\[?[.sxFE]+' 
  lane_rc=${PIPESTATUS[0]}
fi
if [ "${RUN_SWEEP:-0}" = 1 ]; then
  echo "== launch-shape sweep"
  python3 bench/kernel_sweep.py --out "$OUT/sweep.json" ${SWEEP_ARGS:-} 2>"$OUT/sweep.err" | tee "$OUT/sweep.txt"
fi
[ "${RUN_BENCH:-1}" = 1 ] || exit "$lane_rc"
# pytest -q ends with e.g. "12 passed, 3 skipped in 40.2s" (or "no tests ran").
lane_summary=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran' \
  "$OUT/cuda_lane.log" 2>/dev/null | tail -n 1)

# The benchmark's stdout is only its header and table (progress goes to kernels.err), so printing
# the lane summary first leaves both at the end of the output.
echo "== cuda lane (exit $lane_rc): ${lane_summary:-no summary line, see $OUT/cuda_lane.log}"
echo "== kernels"
python3 bench/kernels.py --out "$OUT/kernels.json" "$@" 2>"$OUT/kernels.err" \
  | tee "$OUT/kernels.txt"
bench_rc=$?
if [ "$bench_rc" -ne 0 ]; then
  echo "== bench/kernels.py failed (exit $bench_rc); the end of $OUT/kernels.err:"
  tail -n 40 "$OUT/kernels.err"
  exit "$bench_rc"
fi
exit "$lane_rc"
