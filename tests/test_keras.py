"""The Keras loss in fit/evaluate/custom loops, in graph, XLA and eager modes, and mixed
precision: each train step equals a hand-written GradientTape step on the pure-TF reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_cases import (
    LR,
    NUM_GROUPS,
    grouped_data,
    make_model,
    max_weight_diff,
    packed,
    reference_loss,
    reference_step,
    report,
)

from grouped_mae_op import reference
from grouped_mae_op.loss import GroupedMAE, GroupedMeanAbsoluteError, pack_targets
from grouped_mae_op.metrics import GroupedMeanAbsoluteError as Metric

MODES = {
    "graph": dict(jit_compile=False),
    "xla": dict(jit_compile=True),
    "eager": dict(run_eagerly=True),
}


def _compiled(mode, loss=None, **kw):
    model = make_model(**kw)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=loss or GroupedMeanAbsoluteError(num_groups=NUM_GROUPS),
        weighted_metrics=[Metric(NUM_GROUPS, name="gmae")],
        **MODES[mode],
    )
    return model


def _eval_loss(model, x, y_true, sample_weight=None):
    logs = model.evaluate(
        x, y_true, sample_weight=sample_weight, batch_size=len(x), return_dict=True, verbose=0
    )
    return logs["loss"]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_step_equals_reference_step(mode, weighted):
    x, y, ids, sw = grouped_data()
    sw = sw if weighted else None
    model = _compiled(mode)
    ref = make_model()
    ref.set_weights(model.get_weights())
    ref_loss, ref_weights = reference_step(ref, x, y, ids, sw)

    logs = model.train_on_batch(x, packed(y, ids), sample_weight=sw, return_dict=True)
    diff = max_weight_diff(model.get_weights(), ref_weights)
    report(f"fit step {mode} weighted={weighted} weights", diff)
    report(f"fit step {mode} weighted={weighted} loss", abs(logs["loss"] - ref_loss))
    assert diff < 1e-6
    assert logs["loss"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    # the metric sees the same batch with the weights before the update
    assert logs["gmae"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)

    # evaluate on the updated weights reports the reference loss of the updated model
    got = _eval_loss(model, x, packed(y, ids), sample_weight=sw)
    want = float(reference_loss(model, x, y, ids, sw))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("compiled", [False, True])
def test_custom_loop_step_equals_reference(compiled):
    x, y, ids, sw = grouped_data(targets=2)
    model = make_model(targets=2)
    ref = make_model(targets=2)
    ref.set_weights(model.get_weights())
    loss_fn = GroupedMAE(num_groups=NUM_GROUPS)
    opt = keras.optimizers.SGD(LR)
    y_true = tf.constant(packed(y, ids))

    def step(x, y_true, sw):
        with tf.GradientTape() as tape:
            loss = loss_fn(y_true, model(x, training=True), sample_weight=sw)
        grads = tape.gradient(loss, model.trainable_weights)
        opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))
        return loss

    if compiled:
        step = tf.function(step)
    loss = step(tf.constant(x), y_true, tf.constant(sw))
    ref_loss, ref_weights = reference_step(ref, x, y, ids, sw)
    diff = max_weight_diff(model.get_weights(), ref_weights)
    report(f"custom loop compiled={compiled} weights", diff)
    assert diff < 1e-6
    assert float(loss) == pytest.approx(ref_loss, rel=1e-6)


def test_sample_weight_is_the_row_weight_not_a_multiplier():
    x, y, ids, sw = grouped_data()
    model = _compiled("graph")
    y_true = packed(y, ids)
    base = _eval_loss(model, x, y_true, sample_weight=sw)
    # Scaling every weight leaves each group's weighted mean, and so the loss, unchanged;
    # Keras' default (multiply the finished loss) would triple it.
    tripled = _eval_loss(model, x, y_true, sample_weight=3 * sw)
    assert tripled == pytest.approx(base, rel=1e-6)
    unweighted = _eval_loss(model, x, y_true)
    assert unweighted == pytest.approx(float(reference_loss(model, x, y, ids)), rel=1e-6)
    assert abs(unweighted - base) > 1e-3  # the weights matter
    # A zero weight removes the row, exactly as an ignored id does.
    sw0 = sw.copy()
    sw0[ids == 2] = 0
    ids_ignored = np.where(ids == 2, -1, ids)
    a = _eval_loss(model, x, y_true, sample_weight=sw0)
    b = _eval_loss(model, x, packed(y, ids_ignored), sample_weight=sw)
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_loss_finite_and_decreasing(policy):
    x, y, ids, sw = grouped_data(n=96)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = make_model()
        model.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=GroupedMeanAbsoluteError(num_groups=NUM_GROUPS),
            jit_compile=False,
        )
        first = model.evaluate(x, packed(y, ids), sample_weight=sw, batch_size=96, verbose=0)
        # The loss runs in float32 on the 16-bit predictions; compare with the reference on
        # the same predictions, computed in a graph as evaluate computes them. On an Intel CPU
        # with native 16-bit arithmetic (AVX512-FP16, AMX-BF16), an eager call of the model gave
        # other 16-bit predictions than the graph, and a loss 2e-5 (float16) and 2.4e-4
        # (bfloat16) relative away from evaluate's.
        pred = tf.cast(model.predict(x, batch_size=96, verbose=0), tf.float32)
        want = float(reference.grouped_mae(y, pred, ids, NUM_GROUPS, sample_weight=sw))
        hist = model.fit(x, packed(y, ids), sample_weight=sw, batch_size=96, epochs=15, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = hist.history["loss"]
    report(f"{policy} first loss vs reference", abs(first - want))
    print(f"[measured] {policy} loss over 15 steps: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert np.all(np.isfinite(losses))
    assert first == pytest.approx(want, rel=1e-5)
    assert losses[-1] < 0.9 * losses[0]


def test_xla_requires_num_groups():
    x, y, ids, _ = grouped_data()
    model = _compiled("xla", loss=GroupedMeanAbsoluteError())
    with pytest.raises(ValueError, match="num_groups=None.*XLA"):
        model.train_on_batch(x, packed(y, ids))
    # Without XLA the count comes from the batch: max id + 1.
    model = _compiled("graph", loss=GroupedMeanAbsoluteError())
    got = _eval_loss(model, x, packed(y, ids))
    want = float(reference_loss(model, x, y, ids, num_groups=int(ids.max()) + 1))
    assert got == pytest.approx(want, rel=1e-6)


# --- packing and bad targets ---------------------------------------------------------


def test_pack_targets_numpy_and_tensor():
    y = np.arange(4, dtype=np.float64)
    ids = np.array([3, -1, 0, 2])
    p = pack_targets(y, ids)
    assert p.dtype == np.float64 and p.shape == (4, 2)
    np.testing.assert_array_equal(p[:, 1], ids)
    t = pack_targets(tf.constant(np.ones((4, 2), np.float32)), tf.constant(ids))
    assert t.shape == (4, 3) and t.dtype == tf.float32
    np.testing.assert_array_equal(t.numpy()[:, 2], ids)


@pytest.mark.parametrize("bad", [2.5, 2**24, np.nan])
def test_pack_targets_rejects_inexact_ids(bad):
    with pytest.raises(ValueError, match=r"group_ids\[1\].*integers with \|id\| < 2\^24"):
        pack_targets(np.zeros(3), np.array([0.0, bad, 1.0]))


def test_missing_id_column_is_a_clear_error():
    loss = GroupedMeanAbsoluteError(num_groups=3)
    with pytest.raises(ValueError, match="no group id column.*pack_targets"):
        loss(tf.zeros((4, 2)), tf.zeros((4, 2)))
    with pytest.raises(ValueError, match="y_true must be \\[N, k \\+ 1\\]"):
        loss(tf.zeros((4,)), tf.zeros((4,)))


def test_non_integer_ids_eager_and_graph():
    loss = GroupedMeanAbsoluteError(num_groups=3)
    y_true = np.array([[0.0, 1.0], [0.0, 1.5]], np.float32)
    with pytest.raises(ValueError, match=r"group id column of y_true\[1\] = 1.5"):
        loss(y_true, tf.zeros((2, 1)))

    @tf.function(input_signature=[tf.TensorSpec([None, 2]), tf.TensorSpec([None, 1])])
    def graph_loss(t, p):
        return loss(t, p)

    with pytest.raises(tf.errors.InvalidArgumentError, match="integer group ids.*row"):
        graph_loss(y_true, tf.zeros((2, 1)))
    # Under XLA nothing can raise on data: the loss is NaN.
    xla_loss = tf.function(lambda t, p: loss(t, p), jit_compile=True)
    assert np.isnan(float(xla_loss(tf.constant(y_true), tf.zeros((2, 1)))))
    assert float(xla_loss(tf.constant(y_true[:1]), tf.ones((1, 1)))) == pytest.approx(1.0)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="group_reduction"):
        GroupedMeanAbsoluteError(3, group_reduction="median")
    with pytest.raises(ValueError, match="temperature"):
        GroupedMeanAbsoluteError(3, group_reduction="softmax", temperature=0.0)
    with pytest.raises(ValueError, match=r"group_weights\[1\] = -1.0"):
        GroupedMeanAbsoluteError(2, group_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="num_groups = 3 entries"):
        GroupedMeanAbsoluteError(3, group_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="num_groups must be positive"):
        GroupedMeanAbsoluteError(0)


def test_ids_beyond_num_groups_raise():
    loss = GroupedMeanAbsoluteError(num_groups=2)
    with pytest.raises(ValueError, match="group_ids.*out of range"):
        loss(pack_targets(np.zeros(2), np.array([0, 5])), tf.zeros((2, 1)))


# --- serialization -------------------------------------------------------------------


def test_get_config_round_trip():
    from grouped_mae_op.metrics import GroupedMeanAbsoluteError as Metric

    loss = GroupedMeanAbsoluteError(
        4, group_weights=[1, 2, 0, 1], group_reduction="softmax", temperature=0.25
    )
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is GroupedMeanAbsoluteError
    assert again.get_config() == loss.get_config()
    metric = Metric(4, group_weights=[1, 2, 0, 1], name="gm")
    again = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(again) is Metric and again.get_config() == metric.get_config()


def test_keras_file_round_trip(tmp_path):
    from grouped_mae_op.metrics import GroupedMeanAbsoluteError as Metric

    x, y, ids, sw = grouped_data()
    loss = GroupedMeanAbsoluteError(
        NUM_GROUPS, group_weights=[1, 2, 1, 1, 1, 3], group_reduction="softmax", temperature=0.5
    )
    model = make_model()
    model.compile(optimizer="adam", loss=loss, metrics=[Metric(NUM_GROUPS, name="gmae")])
    model.fit(x, packed(y, ids), sample_weight=sw, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "grouped.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, GroupedMeanAbsoluteError)
    assert loaded.loss.get_config() == loss.get_config()
    before = model.evaluate(x, packed(y, ids), sample_weight=sw, return_dict=True, verbose=0)
    after = loaded.evaluate(x, packed(y, ids), sample_weight=sw, return_dict=True, verbose=0)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert after["gmae"] == pytest.approx(before["gmae"], rel=1e-6)
    # and the loaded model keeps training with the loss
    loaded.fit(x, packed(y, ids), epochs=1, batch_size=16, verbose=0)


def test_reference_is_independent_of_the_op():
    # Sanity check of the harness: the reference and a float64 numpy formula agree.
    x, y, ids, sw = grouped_data()
    pred = np.linspace(-1, 1, len(x), dtype=np.float32)[:, None]
    got = float(reference.grouped_mae(y, pred, ids, NUM_GROUPS, sample_weight=sw))
    e = np.abs(pred[:, 0].astype(np.float64) - y[:, 0])
    means = [
        np.sum(sw[ids == g] * e[ids == g]) / np.sum(sw[ids == g])
        for g in range(NUM_GROUPS)
        if np.any(ids == g)
    ]
    assert got == pytest.approx(np.mean(means), rel=1e-6)


def test_worst_group_reductions_need_num_groups():
    loss = GroupedMeanAbsoluteError(group_reduction="max")
    with pytest.raises(ValueError, match="'max'.*pass num_groups"):
        loss(pack_targets(np.zeros(2), np.array([0, 1])), tf.zeros((2, 1)))


def test_multi_axis_predictions_flatten_to_target_columns():
    rng = np.random.default_rng(7)
    y = rng.normal(size=(10, 2, 3)).astype(np.float32)
    pred = rng.normal(size=(10, 2, 3)).astype(np.float32)
    ids = rng.integers(-1, 3, size=10)
    loss = GroupedMeanAbsoluteError(3)
    want = float(reference.grouped_mae(y, pred, ids, 3))
    assert float(loss(pack_targets(y.reshape(10, 6), ids), pred)) == pytest.approx(want, rel=1e-6)
    unknown = tf.function(
        loss.__call__, input_signature=[tf.TensorSpec([None, None]), tf.TensorSpec([None, 2, 3])]
    )
    assert float(unknown(pack_targets(y.reshape(10, 6), ids), pred)) == pytest.approx(
        want, rel=1e-6
    )
