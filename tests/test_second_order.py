"""Second-order gradients (nested tapes: gradient penalties, Hessian-vector products).

The first-order gradient op, GroupedMaeGrad, gives upstream * scale[g] * w / D * sign(y_pred -
y_true). Its own gradient is zero in y_true and y_pred almost everywhere (as for tf.abs) and
linear in the group scales and in upstream. Each test checks the fused op against a float64
formula written out here and against the pure-TF reference, eagerly, in a tf.function and
under XLA.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import grouped_mae_op as gm
from grouped_mae_op import reference

MODES = ("eager", "function", "xla")
DTYPES = (tf.float16, tf.float32, tf.float64)
RTOL = {tf.float16: 2e-2, tf.float32: 2e-5, tf.float64: 1e-12}
IDS = np.array([0, 2, 2, -1, 0, 3, 3, 3, 0, 2, -1, 0], np.int32)  # group 1 empty
G = 4


def inputs(row_shape, dtype, seed=3):
    """y_true, y_pred away from |x|'s kink, weights, a random direction c; numpy float64."""
    rng = np.random.default_rng(seed)
    shape = (len(IDS), *row_shape)
    y_true = rng.normal(size=shape)
    y_pred = y_true + rng.uniform(0.2, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    # Exactly representable in float16, so that every dtype sees the same signs.
    y_true = y_true.astype(np.float16).astype(np.float64)
    y_pred = y_pred.astype(np.float16).astype(np.float64)
    sw = rng.uniform(0.1, 2.0, len(IDS))
    c = rng.normal(size=shape)
    return y_true, y_pred, sw, c


def run(fn, mode):
    if mode == "eager":
        return fn()
    return tf.function(fn, jit_compile=mode == "xla")()


def rows_factor(y_true, y_pred, sw):
    """w_i / D * sign(y_pred - y_true), float64, 0 for ignored rows."""
    d = int(np.prod(y_true.shape[1:]))
    w = np.where(IDS >= 0, sw, 0.0).reshape((-1,) + (1,) * (y_true.ndim - 1))
    return w / d * np.sign(y_pred - y_true)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("row_shape", [(), (3,)])
def test_penalty_on_the_gradient_differentiates_through_upstream(mode, dtype, row_shape):
    # P(s) = sum((d/dy_pred [s * loss]) * c)^2: the op's upstream is s, so
    # dP/ds = 2 s sum((dloss/dy_pred * c)^2); d^2 loss / dy_pred^2 = 0.
    y_true, y_pred, sw, c = inputs(row_shape, dtype)
    v = np.array([1.0, 2.0, 0.5, 3.0])
    s0 = 1.7

    def penalty(loss_fn):
        def f():
            s = tf.constant(s0, dtype)
            yp = tf.constant(y_pred, dtype)
            with tf.GradientTape(persistent=True) as outer:
                outer.watch([s, yp])
                with tf.GradientTape() as inner:
                    inner.watch(yp)
                    loss = s * loss_fn(
                        tf.constant(y_true, dtype), yp, tf.constant(IDS), G,
                        sample_weight=tf.constant(sw, dtype),
                        group_weights=tf.constant(v, dtype),
                    )  # fmt: skip
                grad = inner.gradient(loss, yp)
                p = tf.reduce_sum(tf.square(tf.cast(grad, tf.float64) * c))
            return p, outer.gradient(p, s), outer.gradient(p, yp)

        return f

    # The float64 formula: dloss/dy_pred = v_g / (W_g * sum v) * w / D * sign.
    w_g = np.array([sw[(IDS == g)].sum() for g in range(G)])
    present = w_g > 0
    scale = np.where(present, v / np.where(present, w_g, 1.0) / v[present].sum(), 0.0)
    first = scale[np.maximum(IDS, 0)].reshape((-1,) + (1,) * len(row_shape))
    first = first * rows_factor(y_true, y_pred, sw)
    want_p = np.sum((s0 * first * c) ** 2)
    want_ds = 2 * s0 * np.sum((first * c) ** 2)

    got_p, got_ds, got_dyp = run(penalty(gm.grouped_mae), mode)
    ref_p, ref_ds, ref_dyp = run(penalty(reference.grouped_mae), mode)
    rtol = RTOL[dtype]
    np.testing.assert_allclose(got_p.numpy(), want_p, rtol=rtol)
    np.testing.assert_allclose(got_ds.numpy(), want_ds, rtol=rtol)
    np.testing.assert_allclose(got_ds.numpy(), ref_ds.numpy(), rtol=rtol)
    assert got_dyp.dtype == dtype and got_dyp.shape == y_pred.shape
    np.testing.assert_array_equal(got_dyp.numpy(), 0)
    np.testing.assert_array_equal(got_dyp.numpy(), ref_dyp.numpy())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("row_shape", [(), (2,)])
def test_hessian_vector_product_through_the_group_sums(mode, dtype, row_shape):
    # L = sum_g a_g S_g^2 is not linear in the sums, so d/dy_pred of (dL/dy_pred . c) goes
    # through the group scales that the stats gradient hands to GroupedMaeGrad:
    #   dL/dy_pred[i] = 2 a_g S_g * w_i / D * sign_i
    #   d/dy_pred[k] (dL/dy_pred . c) = 2 a_g m_g * w_k / D * sign_k,  g = g_k,
    #   m_g = sum over the rows i of g of c_i * w_i / D * sign_i.
    y_true, y_pred, sw, c = inputs(row_shape, dtype, seed=5)
    a = np.array([0.5, 1.0, -2.0, 1.5])

    def hvp(stats_fn):
        def f():
            yp = tf.constant(y_pred, dtype)
            with tf.GradientTape() as outer:
                outer.watch(yp)
                with tf.GradientTape() as inner:
                    inner.watch(yp)
                    sums, _ = stats_fn(
                        tf.constant(y_true, dtype), yp, tf.constant(IDS), G,
                        sample_weight=tf.constant(sw, dtype),
                    )  # fmt: skip
                    loss = tf.reduce_sum(tf.constant(a, sums.dtype) * tf.square(sums))
                grad = inner.gradient(loss, yp)
                q = tf.reduce_sum(tf.cast(grad, tf.float64) * c)
            return outer.gradient(q, yp)

        return f

    factor = rows_factor(y_true, y_pred, sw)
    m = np.array([np.sum((c * factor)[IDS == g]) for g in range(G)])
    per_row = np.where(IDS >= 0, 2 * a[np.maximum(IDS, 0)] * m[np.maximum(IDS, 0)], 0.0)
    want = per_row.reshape((-1,) + (1,) * len(row_shape)) * factor
    assert np.abs(want).max() > 0

    got = run(hvp(gm.grouped_mae_stats), mode)
    ref = run(hvp(reference.grouped_mae_stats), mode)
    assert got.dtype == dtype and got.shape == y_pred.shape
    rtol, atol = RTOL[dtype], RTOL[dtype] * np.abs(want).max()
    np.testing.assert_allclose(got.numpy().astype(np.float64), want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(
        got.numpy().astype(np.float64), ref.numpy().astype(np.float64), rtol=rtol, atol=atol
    )


def test_second_derivative_in_y_true_is_zero_and_ids_get_none():
    y_true = tf.constant([0.0, 1.0, 2.0, 5.0])
    y_pred = tf.constant([1.0, 3.0, 0.0, 4.0])
    ids = tf.constant([0, 1, 1, -1])
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([y_true, ids])
        with tf.GradientTape() as inner:
            inner.watch(y_true)
            loss = gm.grouped_mae(y_true, y_pred, ids, 2)
        g = inner.gradient(loss, y_true)
        total = tf.reduce_sum(g * tf.constant([1.0, -2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(g.numpy(), [-0.5, -0.25, 0.25, 0.0])
    np.testing.assert_array_equal(outer.gradient(total, y_true).numpy(), 0.0)
    assert outer.gradient(total, ids) is None
