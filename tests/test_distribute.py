"""The grouped loss under tf.distribute: the loss is the grouped MAE of the global batch and
the applied update equals the single-device update on the global batch.

MirroredStrategy runs on 2 logical CPU devices (set up in conftest.py); the
MultiWorkerMirroredStrategy test starts 2 worker processes on 127.0.0.1
(examples/distributed_custom_loop.py, the README's multi-node recipe).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

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
from grouped_mae_op.loss import GroupedMeanAbsoluteError
from grouped_mae_op.metrics import GroupedMeanAbsoluteError as Metric

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def strategy():
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "conftest.py must configure 2 logical CPU devices"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def _single_device_step(model, x, y_true, sw, loss_fn):
    """The reference: one hand-written SGD step with `loss_fn` on the whole batch."""
    ref = make_model()
    ref.set_weights(model.get_weights())
    return reference_step(ref, x, None, None, sw, loss_fn=lambda p: loss_fn(y_true, p, sw))


# jit_compile=True is not tested here: Keras' XLA-compiled step under MirroredStrategy on
# logical CPU devices fails for any loss (plain MAE included: "Trying to access resource
# ... located in device CPU:1 from device CPU:0").
@pytest.mark.parametrize("reduction", ["mean", "softmax"])
def test_mirrored_fit_step_equals_single_device(strategy, reduction, jit_compile=False):
    x, y, ids, sw = grouped_data(n=48)
    y_true = packed(y, ids)
    with strategy.scope():
        model = make_model()
        loss_fn = GroupedMeanAbsoluteError(NUM_GROUPS, group_reduction=reduction, temperature=0.5)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss_fn, jit_compile=jit_compile)
    if reduction == "mean":
        ref_loss, ref_weights = reference_step(make_model_like(model), x, y, ids, sw)
    else:  # single-device GroupedMeanAbsoluteError (checked against a reference elsewhere)
        single = GroupedMeanAbsoluteError(NUM_GROUPS, group_reduction=reduction, temperature=0.5)
        ref_loss, ref_weights = _single_device_step(model, x, y_true, sw, single)
    logs = model.train_on_batch(x, y_true, sample_weight=sw, return_dict=True)
    diff = max_weight_diff(model.get_weights(), ref_weights)
    label = f"mirrored fit {reduction} jit={jit_compile}"
    report(f"{label} weights", diff)
    report(f"{label} loss", abs(logs["loss"] - ref_loss))
    assert diff < 1e-6
    assert logs["loss"] == pytest.approx(ref_loss, rel=1e-6)


def make_model_like(model):
    ref = make_model()
    ref.set_weights(model.get_weights())
    return ref


def test_mirrored_evaluate_and_metric(strategy):
    x, y, ids, sw = grouped_data(n=60, seed=4)
    y_true = packed(y, ids)
    with strategy.scope():
        model = make_model()
        metric = Metric(NUM_GROUPS, name="gmae")
        model.compile(
            loss=GroupedMeanAbsoluteError(NUM_GROUPS), weighted_metrics=[metric], jit_compile=False
        )
    # batch 20: three global batches, each split over the two replicas
    got = model.evaluate(x, y_true, sample_weight=sw, batch_size=20, return_dict=True, verbose=0)
    # the metric: grouped MAE over all 60 rows; the loss: the mean of the 3 batch losses
    whole = float(reference_loss(model, x, y, ids, sw))
    assert got["gmae"] == pytest.approx(whole, rel=1e-6)
    batches = [
        float(reference_loss(model, x[i : i + 20], y[i : i + 20], ids[i : i + 20], sw[i : i + 20]))
        for i in (0, 20, 40)
    ]
    assert got["loss"] == pytest.approx(np.mean(batches), rel=1e-6)
    per_group = metric.group_results().numpy()
    e = np.abs(model.predict(x, verbose=0)[:, 0].astype(np.float64) - y[:, 0])
    for g in range(NUM_GROUPS):
        rows = ids == g
        want = np.sum(sw[rows] * e[rows]) / np.sum(sw[rows]) if rows.any() else np.nan
        np.testing.assert_allclose(per_group[g], want, rtol=1e-5, equal_nan=True)


def test_mirrored_custom_loop_unequal_shards(strategy):
    x, y, ids, sw = grouped_data(n=48, seed=2)
    cut = 31  # replica 0 gets 31 rows, replica 1 gets 17
    y_true = packed(y, ids)
    with strategy.scope():
        model = make_model()
        opt = keras.optimizers.SGD(LR)
        loss_fn = GroupedMeanAbsoluteError(NUM_GROUPS)
    ref_loss, ref_weights = reference_step(make_model_like(model), x, y, ids, sw)

    def shard(a):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[:cut] if ctx.replica_id_in_sync_group == 0 else a[cut:])
        )

    @tf.function
    def train_step(xs, ts, ws):
        def step(x, t, w):
            with tf.GradientTape() as tape:
                loss = loss_fn(t, model(x, training=True), sample_weight=w)
            grads = tape.gradient(loss, model.trainable_weights)
            opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))
            return loss

        per_replica = strategy.run(step, args=(xs, ts, ws))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    loss = float(train_step(shard(x), shard(y_true), shard(sw)))
    diff = max_weight_diff(model.get_weights(), ref_weights)
    report("mirrored custom loop (31/17 rows) weights", diff)
    report("mirrored custom loop loss", abs(loss - ref_loss))
    assert diff < 1e-6
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_multi_worker_custom_loop(tmp_path):
    """2 worker processes on loopback, one SGD step: equals the single-device step."""
    script = ROOT / "examples" / "distributed_custom_loop.py"
    cmd = [sys.executable, str(script), "--launch", "2", "--steps", "1", "--lr", "0.5"]
    cmd += ["--out", str(tmp_path), "--timeout", "150"]
    proc = subprocess.run(cmd, timeout=180, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]

    # Rebuild the global batch the script uses and do the step by hand on one device.
    sys.path.insert(0, str(script.parent))
    try:
        import distributed_custom_loop as demo
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    n = 96
    x = rng.normal(size=(n, demo.FEATURES)).astype(np.float32)
    ids = rng.zipf(1.6, size=n).clip(max=demo.NUM_GROUPS) - 1
    y = (x @ rng.normal(size=demo.FEATURES) + 0.5 * ids).astype(np.float32)
    sw = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    assert results[0]["rows"][1] == results[1]["rows"][0] != n // 2  # unequal shards

    w = [tf.Variable(np.array(a, np.float32)) for a in results[0]["initial"]]
    with tf.GradientTape() as tape:
        h = tf.nn.relu(x @ w[0] + w[1])
        pred = h @ w[2] + w[3]
        loss = reference.grouped_mae(y, pred[:, 0], ids, demo.NUM_GROUPS, sample_weight=sw)
    grads = tape.gradient(loss, w)
    want = [v.numpy() - 0.5 * g.numpy() for v, g in zip(w, grads, strict=True)]
    for r in results:
        diff = max_weight_diff([np.array(a) for a in r["final"]], want)
        report(f"multi-worker worker {r['index']} weights", diff)
        report(f"multi-worker worker {r['index']} loss", abs(r["losses"][0] - float(loss)))
        assert diff < 1e-6
        assert r["losses"][0] == pytest.approx(float(loss), rel=1e-6)


def test_distributed_loss_needs_num_groups(strategy):
    loss_fn = GroupedMeanAbsoluteError()
    y_true = tf.constant(packed(np.zeros(4, np.float32), np.array([0, 1, 1, 0])))
    with pytest.raises(ValueError, match="under tf.distribute.*pass num_groups"):
        strategy.run(lambda: loss_fn(y_true, tf.zeros((4, 1))))
