#!/usr/bin/env bash
# One-shot GPU check on a machine with CUDA 13, cmake, PyTorch, JAX and CuPy, without
# TensorFlow and without network (about 5 minutes on an H200; every step has a time limit):
#   1. build the TF-free core module (-DGMAE_TF=OFF) and the sanitizer driver for this GPU;
#   2. the GPU tests (tests/gpu) through that module;
#   3. compute-sanitizer memcheck and racecheck on the kernels (tests/gpu/sanitize_driver.cu);
#   4. the benchmark (scripts/gpu_bench.py): ours vs PyTorch vs JAX, bandwidth vs a copy.
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]   (default: $OUT, else ./gpu_results)
# Results (8 files): summary.txt env.txt build.log pytest.txt memcheck.txt racecheck.txt
# bench.txt bench.json. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
RESULTS="${1:-${OUT:-gpu_results}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
BUILD="${GMAE_GPU_BUILD_DIR:-build-gpu}"
case "$BUILD" in /*) ;; *) BUILD="$PWD/$BUILD" ;; esac
PY="${PYTHON:-python3}"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
status=0

step() {  # step NAME LIMIT_SECONDS LOGFILE COMMAND...
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  printf '%-10s rc=%-3s %4ss  (%s)\n' "$name" "$rc" "$((SECONDS - t0))" "$(basename "$log")" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# --- environment --------------------------------------------------------------------------
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  cmake --version | head -1
  "$PY" - <<'PYEOF'
import importlib
for name in ("numpy", "torch", "jax", "cupy", "pybind11", "pytest", "tensorflow"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # report, do not fail
        print(name, "not available:", type(e).__name__)
PYEOF
} >"$RESULTS/env.txt" 2>&1

# --- 1. build -----------------------------------------------------------------------------
CC_NUM="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
ARCHS="${GMAE_CUDA_ARCHITECTURES:-${CC_NUM:-90}}"
PYBIND_ARGS=()
if ! "$PY" -m pybind11 --cmakedir >/dev/null 2>&1; then
  # No pybind11 package: use the headers PyTorch ships.
  TORCH_PYBIND="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"
  PYBIND_ARGS=(-DGMAE_PYBIND11_INCLUDE_DIR="$TORCH_PYBIND")
  echo "pybind11 package not found: using headers from $TORCH_PYBIND" >>"$RESULTS/build.log"
fi
GEN=()
command -v ninja >/dev/null && [ ! -f "$BUILD/CMakeCache.txt" ] && GEN=(-G Ninja)
CMAKE_ARGS=(-S . -B "$BUILD" "${GEN[@]}" -DGMAE_TF=OFF -DGMAE_CUDA=ON
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DPython3_EXECUTABLE="$(command -v "$PY")"
  -DGMAE_OUTPUT_DIR="$BUILD/core" "${PYBIND_ARGS[@]}")
TARGETS=(gmae_core_module gmae_sanitize_driver)
if ! step configure 120 "$RESULTS/build.log" cmake "${CMAKE_ARGS[@]}"; then
  # Most likely no Python headers for the module: keep the sanitizer driver at least.
  rm -rf "$BUILD"
  step configure2 120 "$RESULTS/build.log" cmake "${CMAKE_ARGS[@]}" -DGMAE_CORE_MODULE=OFF
  TARGETS=(gmae_sanitize_driver)
fi
step build 300 "$RESULTS/build.log" cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}"
built=$?

# --- 2. GPU tests -------------------------------------------------------------------------
if [ "$built" -eq 0 ]; then
  export GMAE_CORE_DIR="$BUILD/core" GMAE_REQUIRE_GPU=1
  step pytest 240 "$RESULTS/pytest.txt" \
    "$PY" -m pytest tests/gpu --confcutdir=tests/gpu -p no:cacheprovider -q -rs --durations=5

  # --- 3. compute-sanitizer ---------------------------------------------------------------
  step memcheck 120 "$RESULTS/memcheck.txt" "$SANITIZER" --tool memcheck --leak-check full \
    --error-exitcode 3 "$BUILD/gmae_sanitize_driver"
  step racecheck 180 "$RESULTS/racecheck.txt" "$SANITIZER" --tool racecheck \
    --racecheck-report all --error-exitcode 3 "$BUILD/gmae_sanitize_driver"

  # --- 4. benchmark -----------------------------------------------------------------------
  # shellcheck disable=SC2086  # GMAE_BENCH_ARGS: extra arguments, split on purpose
  step bench 300 "$RESULTS/bench.txt" "$PY" scripts/gpu_bench.py --core-dir "$BUILD/core" \
    --json "$RESULTS/bench.json" ${GMAE_BENCH_ARGS:-}
else
  echo "build failed: tests, sanitizers and benchmark skipped" | tee -a "$SUMMARY"
fi

{
  echo
  echo "--- pytest (last lines)"
  tail -n 15 "$RESULTS/pytest.txt" 2>/dev/null
  echo "--- sanitizers (last lines)"
  tail -n 3 "$RESULTS/memcheck.txt" "$RESULTS/racecheck.txt" 2>/dev/null
  echo "--- benchmark"
  cat "$RESULTS/bench.txt" 2>/dev/null
} >>"$SUMMARY"
echo "results in $RESULTS (status $status)"
exit "$status"
