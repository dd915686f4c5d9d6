"""The TF op library and the TF-free core module compile the same CPU kernels
(csrc/cpu/grouped_mae_cpu.h) with different instruction sets on x86-64: AVX and POPCNT for the
op library (GMAE_CPU_AVX, the default), the compiler's SSE2 baseline for the core module. Neither
may change a sum: with one shard (N < 2 * 32768 rows) both must give the same bits for the
statistics, the loss and the gradient, on every forward path (one id per block, long and short
runs, the unsorted scatter, ignored rows, weights, several elements a row)."""

import numpy as np
import pytest
import tensorflow as tf
from cases import formula_loss

import grouped_mae_op as gm
from grouped_mae_op import _core

N = 60_000  # under 2 * 32768 rows: one forward shard and one backward shard, whatever the threads


def make_ids(rng, layout, g):
    if layout == "sorted":
        return np.sort(rng.integers(0, g, N))
    if layout == "runs_of_7":
        return (np.arange(N) // 7) % g
    ids = rng.integers(0, g, N)
    if layout == "uniform_with_ignored":
        ids[rng.random(N) < 0.1] = -1
    return ids


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layout", ["sorted", "runs_of_7", "uniform", "uniform_with_ignored"])
@pytest.mark.parametrize("g", [10, 1000, 50_000])
def test_op_library_and_core_module_give_the_same_bits(g, layout, weighted, d, dtype):
    rng = np.random.default_rng(g + 7 * d)
    shape = (N,) if d == 1 else (N, d)
    y_true = rng.normal(size=shape).astype(dtype)
    y_pred = rng.normal(size=shape).astype(dtype)
    ids = make_ids(rng, layout, g).astype(np.int32)
    sw = rng.uniform(0, 2, N).astype(dtype) if weighted else None

    core_sums, core_weights = _core.cpu_stats(y_true, y_pred, ids, g, sample_weight=sw)
    core_loss, core_scale = _core.cpu_loss(y_true, y_pred, ids, g, sample_weight=sw)
    core_grad = _core.cpu_backward(y_true, y_pred, ids, core_scale, 1.0, sample_weight=sw)

    with tf.device("CPU:0"):
        yp = tf.constant(y_pred)
        sw_t = None if sw is None else tf.constant(sw)
        with tf.GradientTape() as tape:
            tape.watch(yp)
            loss = gm.grouped_mae(tf.constant(y_true), yp, ids, g, sample_weight=sw_t)
        grad = tape.gradient(loss, yp).numpy()
        sums, weights = gm.grouped_mae_stats(tf.constant(y_true), yp, ids, g, sample_weight=sw_t)

    # The op returns float32 statistics and loss for float32 inputs: the core's float64 values
    # rounded once. For float64 inputs, the float64 values themselves.
    np.testing.assert_array_equal(sums.numpy(), core_sums.astype(sums.dtype.as_numpy_dtype))
    np.testing.assert_array_equal(
        weights.numpy(), core_weights.astype(weights.dtype.as_numpy_dtype)
    )
    assert loss.numpy() == dtype(core_loss)
    np.testing.assert_array_equal(grad, core_grad)
    # Not a vacuous comparison: the values are those of the float64 formula.
    want = formula_loss(y_true, y_pred, ids, g, sw)
    np.testing.assert_allclose(core_loss, want, rtol=1e-6 if dtype == np.float32 else 1e-12)
