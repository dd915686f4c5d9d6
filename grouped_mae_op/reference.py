"""Pure-TensorFlow grouped MAE with the same signatures and semantics as the fused op.

Used as the reference in the tests and usable as a fallback where the compiled library is
not available (it only needs TensorFlow). It is a composite of unsorted_segment_sum and
element-wise ops: correct, but several passes over the data (see the benchmarks).
Accumulates in float64 for float32/float64 inputs and float32 for 16-bit inputs.
"""

from __future__ import annotations

import tensorflow as tf

from grouped_mae_op._checks import prepare, stats_dtype


def _acc_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype in (tf.float32, tf.float64) else tf.float32


def _stats(a):
    acc = _acc_dtype(a.y_pred.dtype)
    g = tf.cast(a.num_groups, a.group_ids.dtype)
    checks = [
        tf.debugging.assert_less(
            a.group_ids,
            g,
            message="group_ids out of range: ids must be < num_groups (negative ids are ignored)",
        ),
        tf.debugging.assert_positive(a.num_groups, message="num_groups must be positive"),
    ]
    valid = a.group_ids >= 0
    diff = tf.abs(tf.cast(a.y_pred, acc) - tf.cast(a.y_true, acc))
    rank = tf.rank(diff)
    e = tf.reduce_mean(diff, axis=tf.range(1, rank))
    if a.sample_weight is None:
        w = tf.ones_like(e)
    else:
        w = tf.cast(a.sample_weight, acc)
        checks.append(
            tf.debugging.assert_greater_equal(
                tf.where(valid, w, tf.zeros_like(w)),
                tf.zeros_like(w),
                message="sample_weight must be >= 0",
            )
        )
    with tf.control_dependencies(checks):
        ids = tf.where(valid, a.group_ids, tf.zeros_like(a.group_ids))
        zeros = tf.zeros_like(e)
        s = tf.math.unsorted_segment_sum(tf.where(valid, w * e, zeros), ids, a.num_groups)
        wsum = tf.math.unsorted_segment_sum(tf.where(valid, w, zeros), ids, a.num_groups)
    return s, wsum


def grouped_mae_stats(y_true, y_pred, group_ids, num_groups=None, *, sample_weight=None):
    """Reference for `grouped_mae_op.grouped_mae_stats`: (S [G], W [G])."""
    a = prepare(y_true, y_pred, group_ids, num_groups, sample_weight)
    s, w = _stats(a)
    out = stats_dtype(a.y_pred.dtype)
    return tf.cast(s, out), tf.cast(w, out)


def finalize(sums, weights, group_weights=None):
    """Loss from per-group sums and weights (any float dtype): sum v S/W / sum v over W != 0."""
    present = tf.not_equal(weights, 0)
    v = tf.ones_like(sums) if group_weights is None else tf.cast(group_weights, sums.dtype)
    zeros = tf.zeros_like(sums)
    safe_w = tf.where(present, weights, tf.ones_like(weights))
    num = tf.reduce_sum(tf.where(present, v * sums / safe_w, zeros))
    vsum = tf.reduce_sum(tf.where(present, v, zeros))
    empty = tf.equal(vsum, 0)
    return tf.where(empty, tf.zeros_like(num), num / tf.where(empty, tf.ones_like(vsum), vsum))


def grouped_mae(
    y_true, y_pred, group_ids, num_groups=None, *, sample_weight=None, group_weights=None
):
    """Reference for `grouped_mae_op.grouped_mae`: a scalar in y_pred's dtype."""
    a = prepare(y_true, y_pred, group_ids, num_groups, sample_weight, group_weights)
    s, w = _stats(a)
    v = None
    if a.group_weights is not None:
        v = tf.cast(a.group_weights, s.dtype)
        with tf.control_dependencies(
            [tf.debugging.assert_greater_equal(v, tf.zeros_like(v), "group_weights must be >= 0")]
        ):
            v = tf.identity(v)
    return tf.cast(finalize(s, w, v), a.y_pred.dtype)
