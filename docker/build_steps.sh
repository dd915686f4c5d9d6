#!/usr/bin/env bash
# The steps of docker/Dockerfile, in a script so that they can run (and be checked) outside
# Docker too: `make docker-steps` runs `build test` on this machine with its CPU TensorFlow.
#
#   bash docker/build_steps.sh STEP...      STEP: deps | build | test | bench
#     deps   pip install $GMAE_TF_REQUIREMENT and requirements.txt (without its tensorflow-cpu)
#     build  compile and install the package (non-editable) with CMake through setup.py
#     test   pytest on the installed package; GPU-marked tests run when a GPU is visible
#     bench  the quick CPU benchmark, and scripts/gpu_bench.py --quick when a GPU is visible
#
# Environment: PYTHON (default python3), GMAE_TF_REQUIREMENT (default tensorflow-cpu==2.21.0),
# GMAE_CUDA / GMAE_CUDA_ARCHITECTURES / GMAE_XLA (setup.py), GMAE_INSTALL_TARGET (install into
# this directory instead of the environment, and test from there), GMAE_TEST_ARGS (pytest
# arguments, default: the whole suite).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TARGET="${GMAE_INSTALL_TARGET:-}"
export GMAE_BUILD_DIR="${GMAE_BUILD_DIR:-$ROOT/build/docker}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# Runs python with the installed package first on the path and the source tree off it.
run_installed() {
  local pp="${TARGET:+$TARGET${PYTHONPATH:+:$PYTHONPATH}}"
  (cd /tmp && PYTHONPATH="${pp:-${PYTHONPATH:-}}" "$PY" "$@")
}

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

step_deps() {
  "$PY" -m pip install --upgrade pip
  "$PY" -m pip install "${GMAE_TF_REQUIREMENT:-tensorflow-cpu==2.21.0}"
  grep -v -E '^(tensorflow|tensorflow-cpu)==' "$ROOT/requirements.txt" >/tmp/requirements-no-tf.txt
  "$PY" -m pip install -r /tmp/requirements-no-tf.txt
}

step_build() {
  local args=(--no-build-isolation --no-deps)
  if [ -n "$TARGET" ]; then
    rm -rf "$TARGET"
    args+=(--target "$TARGET")
  fi
  (cd "$ROOT" && "$PY" -m pip install "${args[@]}" .)
  run_installed -c 'import grouped_mae_op as g, json; print(json.dumps(g.build_info()))'
}

step_test() {
  # shellcheck disable=SC2086  # GMAE_TEST_ARGS is a list of pytest arguments
  run_installed -m pytest -q -p no:cacheprovider --rootdir "$ROOT" ${GMAE_TEST_ARGS:-"$ROOT/tests"}
}

step_bench() {
  if run_installed -c 'import grouped_mae_op.bench' >/dev/null 2>&1; then
    local quick=()
    run_installed -m grouped_mae_op.bench --help 2>/dev/null | grep -q -- --quick && quick=(--quick)
    run_installed -m grouped_mae_op.bench "${quick[@]}"
  fi
  if has_gpu; then
    local pkg
    pkg="$(run_installed -c 'import grouped_mae_op, os; print(os.path.dirname(grouped_mae_op.__file__))')"
    if run_installed -c 'import torch' >/dev/null 2>&1; then
      "$PY" "$ROOT/scripts/gpu_bench.py" --quick --no-jax --core-dir "$pkg" --json /tmp/gpu_bench.json
    else
      echo "PyTorch is not installed: scripts/gpu_bench.py (which compares against it) skipped"
    fi
  fi
}

[ "$#" -gt 0 ] || { sed -n '2,17p' "$0"; exit 2; }
for s in "$@"; do
  case "$s" in
    deps | build | test | bench) echo "=== build_steps: $s" && "step_$s" ;;
    *) echo "unknown step '$s' (deps, build, test, bench)" >&2 && exit 2 ;;
  esac
done
