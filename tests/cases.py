"""Test data shared by the op tests: hand-computed cases, the float64 formula, tolerances.

CASES are plain data. Each expected loss was worked out by hand from the definition
(group means, then the v-weighted mean over present groups); the arithmetic is in the
comment next to it, not computed by code under test.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# name -> inputs and the expected loss. Optional keys: num_groups (default None),
# sample_weight, group_weights, ids_dtype (default int32), sums/weights (expected stats).
CASES = {
    # Group means 1 and 3, group 1 empty: (1 + 3) / 2. Averaging over all 3 groups
    # (the article's mistake) gives 4/3.
    "article_counterexample": dict(
        y_true=[0.0, 0.0, 0.0, 0.0],
        y_pred=[1.0, 1.0, 3.0, 3.0],
        group_ids=[0, 0, 2, 2],
        num_groups=3,
        loss=2.0,
        sums=[2.0, 0.0, 6.0],
        weights=[2.0, 0.0, 2.0],
    ),
    # Unequal group sizes: group 0 has errors 1, 2, 3 (mean 2), group 1 has 10 (mean 10);
    # the grouped loss is (2 + 10) / 2 = 6, a plain MAE would be 16 / 4 = 4.
    "unequal_sizes": dict(
        y_true=[1.0, 2.0, 3.0, 5.0],
        y_pred=[2.0, 0.0, 6.0, -5.0],
        group_ids=[0, 0, 0, 1],
        num_groups=2,
        loss=6.0,
        sums=[6.0, 10.0],
        weights=[3.0, 1.0],
    ),
    # Negative ids are ignored: only rows 1 and 3 count, group 0 mean (4 + 2) / 2 = 3.
    "negative_ids_ignored": dict(
        y_true=[0.0, 0.0, 0.0, 0.0],
        y_pred=[100.0, 4.0, -7.0, -2.0],
        group_ids=[-1, 0, -5, 0],
        num_groups=1,
        loss=3.0,
        sums=[6.0],
        weights=[2.0],
    ),
    # Unsorted ids, num_groups inferred as max id + 1 = 3. Errors 1, 4, 1, 1, 1:
    # g0 = rows 2, 3 (mean 1), g1 = row 1 (4), g2 = rows 0, 4 (mean 1); (1 + 4 + 1) / 3 = 2.
    "unsorted_ids_inferred_num_groups": dict(
        y_true=[0.0, 1.0, 2.0, 3.0, 4.0],
        y_pred=[1.0, 5.0, 1.0, 4.0, 3.0],
        group_ids=[2, 1, 0, 0, 2],
        loss=2.0,
        sums=[2.0, 4.0, 2.0],
        weights=[2.0, 1.0, 2.0],
        ids_dtype="int64",
    ),
    "empty_input": dict(y_true=[], y_pred=[], group_ids=[], num_groups=4, loss=0.0),
    "empty_input_inferred_num_groups": dict(
        y_true=[], y_pred=[], group_ids=[], loss=0.0, sums=[0.0], weights=[0.0]
    ),
    "all_ids_negative": dict(
        y_true=[1.0, 2.0], y_pred=[3.0, 9.0], group_ids=[-1, -2], num_groups=2, loss=0.0
    ),
    # Sample weights: group 0 = (1*2 + 3*4) / (1 + 3) = 3.5, group 1 = 6 (its 0-weight
    # row is dropped), so (3.5 + 6) / 2 = 4.75.
    "sample_weight": dict(
        y_true=[0.0, 0.0, 0.0, 0.0],
        y_pred=[2.0, -4.0, 6.0, 50.0],
        group_ids=[0, 0, 1, 1],
        num_groups=2,
        sample_weight=[1.0, 3.0, 2.0, 0.0],
        loss=4.75,
        sums=[14.0, 12.0],
        weights=[4.0, 2.0],
    ),
    # A group whose weights are all 0 is absent: only group 1 (mean 6) counts.
    "zero_weight_group_absent": dict(
        y_true=[0.0, 0.0, 0.0],
        y_pred=[2.0, 6.0, 6.0],
        group_ids=[0, 1, 1],
        num_groups=2,
        sample_weight=[0.0, 1.0, 1.0],
        loss=6.0,
    ),
    # Group weights: means 1, 3, 5 with v = 1, 0, 3: (1*1 + 0*3 + 3*5) / (1 + 0 + 3) = 4.
    "group_weights": dict(
        y_true=[0.0, 0.0, 0.0],
        y_pred=[1.0, 3.0, 5.0],
        group_ids=[0, 1, 2],
        num_groups=3,
        group_weights=[1.0, 0.0, 3.0],
        loss=4.0,
    ),
    # The weight of an absent group (2) does not enter the denominator: (2*1 + 1*3) / 3.
    "group_weight_of_absent_group_ignored": dict(
        y_true=[0.0, 0.0],
        y_pred=[1.0, 3.0],
        group_ids=[0, 1],
        num_groups=3,
        group_weights=[2.0, 1.0, 100.0],
        loss=5.0 / 3.0,
    ),
    "group_weights_sum_to_zero": dict(
        y_true=[0.0, 0.0],
        y_pred=[1.0, 3.0],
        group_ids=[0, 1],
        num_groups=2,
        group_weights=[0.0, 0.0],
        loss=0.0,
    ),
    # D > 1: row errors are means over the row. Rows [1, 3] -> 2, [0, 4] -> 2, [6, 6] -> 6:
    # group 0 (rows 0, 1) = 2, group 1 = 6, loss 4.
    "rows_of_two": dict(
        y_true=[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
        y_pred=[[1.0, -3.0], [1.0, 5.0], [6.0, -6.0]],
        group_ids=[0, 0, 1],
        num_groups=2,
        loss=4.0,
        sums=[4.0, 6.0],
        weights=[2.0, 1.0],
    ),
    # [N, 2, 3]: row 0 has errors 1..6 (mean 3.5), row 1 all 1 (mean 1); separate groups.
    "rows_of_2x3": dict(
        y_true=[[[0.0] * 3] * 2, [[0.0] * 3] * 2],
        y_pred=[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]],
        group_ids=[1, 0],
        num_groups=2,
        loss=2.25,
        sums=[1.0, 3.5],
        weights=[1.0, 1.0],
    ),
}

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

# Relative tolerances. Every term of the loss and of S, W is >= 0, so no cancellation:
# the only errors are the rounding of |pred - true| (computed in float32, or float64 for
# float64 input: 2^-24 resp. 2^-53), the accumulation (float64 on the CPU and for float32
# on the GPU; float32 for 16-bit inputs on the GPU, N * 2^-24 < 2e-5 for N <= 300), and the
# final rounding of the loss to the input dtype (half an ulp: 2^-11 for float16, 2^-8 for
# bfloat16, 2^-24 for float32).
#   formula: op vs the float64 formula on the same (already rounded) inputs;
#   reference: op vs the pure-TF reference, which rounds its own result, so the two can
#   fall one ulp apart.
LOSS_RTOL = {
    "formula": {tf.float16: 1e-3, tf.bfloat16: 8e-3, tf.float32: 1e-6, tf.float64: 1e-12},
    "reference": {tf.float16: 2e-3, tf.bfloat16: 1.6e-2, tf.float32: 2e-6, tf.float64: 1e-12},
}
# S and W are float32 for 16-bit and float32 inputs (their rounding is 2^-24, plus the
# float32 accumulation of 16-bit inputs on the GPU), float64 for float64.
STATS_RTOL = {tf.float16: 3e-5, tf.bfloat16: 3e-5, tf.float32: 1e-6, tf.float64: 1e-12}
# Gradient entries are sign * w_i * v_g / (D * W_g * sum v): a few float32 (Out) products
# rounded to the input dtype.
GRAD_RTOL = LOSS_RTOL["reference"]


def as_float64(x) -> np.ndarray | None:
    """The exact values of a (possibly 16-bit) array or tensor, as float64."""
    if x is None:
        return None
    if isinstance(x, tf.Tensor):
        x = tf.cast(x, tf.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _row_errors(t, p, n):
    """e_i = mean over the non-batch elements of |p_i - t_i|, float64 [n]."""
    with np.errstate(invalid="ignore"):  # inf - inf is NaN on purpose
        return np.abs(p - t).reshape(n, int(np.prod(p.shape[1:]))).mean(axis=1)


def formula_stats(y_true, y_pred, group_ids, num_groups, sample_weight=None):
    """S [G] and W [G] in float64 straight from the definition (rows with a negative id are
    left out). Vectorised: it also serves the tests with 2^19 rows."""
    t = as_float64(y_true)
    p = as_float64(y_pred)
    ids = np.asarray(group_ids, dtype=np.int64)
    n = len(ids)
    w = np.ones(n) if sample_weight is None else as_float64(sample_weight)
    keep = ids >= 0
    if keep.any() and ids[keep].max() >= num_groups:
        raise IndexError(f"group id {ids[keep].max()} >= num_groups = {num_groups}")
    with np.errstate(invalid="ignore"):  # a zero weight times an Inf error is NaN, as in S
        we = w * _row_errors(t, p, n)
    sums = np.bincount(ids[keep], weights=we[keep], minlength=num_groups)
    weights = np.bincount(ids[keep], weights=w[keep], minlength=num_groups)
    return sums, weights


def formula_loss(y_true, y_pred, group_ids, num_groups, sample_weight=None, group_weights=None):
    """The grouped MAE in float64 from the definition (the formula in the README)."""
    sums, weights = formula_stats(y_true, y_pred, group_ids, num_groups, sample_weight)
    v = np.ones(num_groups) if group_weights is None else as_float64(group_weights)
    present = weights != 0
    vsum = v[present].sum()
    if vsum == 0:
        return 0.0
    return float(np.sum(v[present] * sums[present] / weights[present]) / vsum)


def formula_grad(
    y_true, y_pred, group_ids, num_groups, sample_weight=None, group_weights=None
) -> np.ndarray:
    """d loss / d y_pred in float64: sign(p - t) * w_i * v_g / (D * W_g * sum of present v),
    and 0 for ignored rows, absent groups and a zero sum of v."""
    t = as_float64(y_true)
    p = as_float64(y_pred)
    ids = np.asarray(group_ids, dtype=np.int64)
    n = len(ids)
    _, weights = formula_stats(y_true, y_pred, group_ids, num_groups, sample_weight)
    w = np.ones(n) if sample_weight is None else as_float64(sample_weight)
    v = np.ones(num_groups) if group_weights is None else as_float64(group_weights)
    vsum = v[weights != 0].sum()
    d = int(np.prod(p.shape[1:]))
    g = np.where(ids >= 0, ids, 0)
    rows = (ids >= 0) & (weights[g] != 0) & (vsum != 0)
    factor = np.zeros(n)
    factor[rows] = w[rows] * v[g[rows]] / (d * weights[g[rows]] * vsum)
    with np.errstate(invalid="ignore"):
        grad = np.sign(p - t) * factor.reshape((n,) + (1,) * (p.ndim - 1))
    return np.where(rows.reshape((n,) + (1,) * (p.ndim - 1)), grad, 0.0)
