"""The grouped MAE metric: accumulates per-group sums over batches and resets per epoch."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_cases import NUM_GROUPS, grouped_data, make_model, packed

from grouped_mae_op import reference
from grouped_mae_op.metrics import GroupedMeanAbsoluteError as Metric


def _numpy_group_means(y, pred, ids, sw, num_groups=NUM_GROUPS):
    e = np.abs(pred.astype(np.float64) - y).mean(axis=1)
    out = np.full(num_groups, np.nan)
    for g in range(num_groups):
        rows = ids == g
        if rows.any():
            out[g] = np.sum(sw[rows] * e[rows]) / np.sum(sw[rows])
    return out


@pytest.mark.parametrize("group_weights", [None, [1.0, 2.0, 1.0, 0.5, 1.0, 3.0]])
def test_metric_over_batches_equals_reference_on_all_data(group_weights):
    x, y, ids, sw = grouped_data(n=60, targets=2)
    pred = np.random.default_rng(5).normal(size=y.shape).astype(np.float32)
    m = Metric(NUM_GROUPS, group_weights=group_weights)
    for lo in range(0, 60, 13):  # uneven batches; some miss groups
        m.update_state(
            packed(y[lo : lo + 13], ids[lo : lo + 13]), pred[lo : lo + 13], sw[lo : lo + 13]
        )
    want = float(
        reference.grouped_mae(
            y, pred, ids, NUM_GROUPS, sample_weight=sw, group_weights=group_weights
        )
    )
    assert float(m.result()) == pytest.approx(want, rel=1e-6)
    # not the mean of the per-batch values
    batch_values = []
    for lo in range(0, 60, 13):
        b = Metric(NUM_GROUPS, group_weights=group_weights)
        b.update_state(
            packed(y[lo : lo + 13], ids[lo : lo + 13]), pred[lo : lo + 13], sw[lo : lo + 13]
        )
        batch_values.append(float(b.result()))
    assert abs(np.mean(batch_values) - want) > 1e-3

    per_group = m.group_results().numpy()
    expected = _numpy_group_means(y, pred, ids, sw)
    assert np.isnan(per_group[4]) and np.isnan(expected[4])  # group 4 never appears
    np.testing.assert_allclose(per_group, expected, rtol=1e-6, equal_nan=True)

    m.reset_state()
    assert float(m.result()) == 0.0
    assert np.all(np.isnan(m.group_results().numpy()))


def test_metric_in_fit_and_evaluate_resets_each_epoch():
    x, y, ids, sw = grouped_data(n=64)
    model = make_model()
    y_true = packed(y, ids)
    # lr 0 keeps the weights, so every epoch sees the same predictions; the loss is a plain
    # MAE on the target column, the metrics read the id column. Keras passes sample_weight
    # to `weighted_metrics` only.
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=lambda t, p: tf.reduce_mean(tf.abs(t[:, :1] - p)),
        metrics=[Metric(NUM_GROUPS, name="gmae")],
        weighted_metrics=[Metric(NUM_GROUPS, name="gmae_w")],
    )
    hist = model.fit(x, y_true, sample_weight=sw, batch_size=16, epochs=2, shuffle=False, verbose=0)
    pred = model.predict(x, verbose=0)
    want = float(reference.grouped_mae(y, pred, ids, NUM_GROUPS))
    want_w = float(reference.grouped_mae(y, pred, ids, NUM_GROUPS, sample_weight=sw))
    assert abs(want - want_w) > 1e-3
    np.testing.assert_allclose(hist.history["gmae"], [want, want], rtol=1e-6)
    np.testing.assert_allclose(hist.history["gmae_w"], [want_w, want_w], rtol=1e-6)
    for _ in range(2):
        got = model.evaluate(
            x, y_true, sample_weight=sw, batch_size=10, return_dict=True, verbose=0
        )
        assert got["gmae"] == pytest.approx(want, rel=1e-6)
        assert got["gmae_w"] == pytest.approx(want_w, rel=1e-6)


def test_metric_needs_num_groups():
    with pytest.raises(ValueError, match="num_groups"):
        Metric(None)
