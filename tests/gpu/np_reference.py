"""The grouped-MAE formula in float64 numpy: the independent reference for the core module's
CPU path (tests/test_core_module.py) and its CUDA path (tests/gpu)."""

import numpy as np


def grouped_mae_np(y_true, y_pred, ids, num_groups, sample_weight=None, group_weights=None):
    """Returns (sums S, weights W, loss, group_scale), all float64."""
    ids = np.asarray(ids).astype(np.int64)
    n = ids.shape[0]
    yt = np.asarray(y_true, np.float64).reshape(n, -1)
    yp = np.asarray(y_pred, np.float64).reshape(n, -1)
    e = np.abs(yp - yt).mean(axis=1)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    keep = ids >= 0
    s = np.bincount(ids[keep], weights=(w * e)[keep], minlength=num_groups)
    wsum = np.bincount(ids[keep], weights=w[keep], minlength=num_groups)
    v = np.ones(num_groups) if group_weights is None else np.asarray(group_weights, np.float64)
    present = wsum != 0
    vsum = v[present].sum()
    loss = (v[present] * s[present] / wsum[present]).sum() / vsum if vsum != 0 else 0.0
    scale = np.zeros(num_groups)
    if vsum != 0:
        scale[present] = v[present] / (wsum[present] * vsum)
    return s, wsum, loss, scale


def grad_np(y_true, y_pred, ids, scale, upstream=1.0, sample_weight=None):
    """d(upstream * loss)/d y_pred with tf.abs's sign convention (sign(0) = 0)."""
    ids = np.asarray(ids).astype(np.int64)
    n = ids.shape[0]
    shape = np.shape(y_pred)
    yt = np.asarray(y_true, np.float64).reshape(n, -1)
    yp = np.asarray(y_pred, np.float64).reshape(n, -1)
    d = yt.shape[1]
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    factor = np.where(ids >= 0, upstream * np.asarray(scale, np.float64)[np.maximum(ids, 0)], 0.0)
    return (np.sign(yp - yt) * (factor * w / d)[:, None]).reshape(shape)
