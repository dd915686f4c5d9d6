"""Group reductions ("mean", "max", "softmax"): values against a float64 numpy formula and
gradients against an independent TF composite of the reference per-group statistics."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from grouped_mae_op import reference
from grouped_mae_op.loss import GroupedMeanAbsoluteError, pack_targets

G = 5
# Group 3 is absent; id -1 rows are ignored; group 4 has zero group weight in CASES[1].
CASES = [
    dict(group_weights=None),
    dict(group_weights=[1.0, 2.0, 0.5, 1.0, 0.0]),
]


def _data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 2)).astype(np.float32)
    pred = rng.normal(size=(n, 2)).astype(np.float32)
    ids = rng.choice([0, 0, 0, 1, 2, 2, 4, -1], size=n).astype(np.int32)
    sw = rng.uniform(0.1, 3.0, size=n).astype(np.float32)
    return y, pred, ids, sw


def _numpy_group_means(y, pred, ids, sw):
    e = np.abs(pred.astype(np.float64) - y).mean(axis=1)
    return {
        g: np.sum(sw[ids == g] * e[ids == g]) / np.sum(sw[ids == g])
        for g in range(G)
        if np.any(ids == g)
    }


def _numpy_loss(means, reduction, v, temperature):
    v = {g: 1.0 for g in range(G)} if v is None else dict(enumerate(v))
    groups = [g for g in means if v[g] > 0] if reduction != "mean" else list(means)
    m = np.array([means[g] for g in groups])
    w = np.array([v[g] for g in groups])
    if reduction == "mean":
        return np.sum(w * m) / np.sum(w)
    if reduction == "max":
        return m.max()
    z = m / temperature + np.log(w)
    p = np.exp(z - z.max())
    p /= p.sum()
    return np.sum(p * m)


def _independent_tf_loss(y, pred, ids, sw, reduction, v, temperature):
    """The same reductions written group by group on the reference's (S, W)."""
    s, w = reference.grouped_mae_stats(y, pred, ids, G, sample_weight=sw)
    v = [1.0] * G if v is None else v
    present = [g for g in range(G) if float(w[g]) > 0 and (reduction == "mean" or v[g] > 0)]
    means = [s[g] / w[g] for g in present]
    if reduction == "mean":
        return tf.add_n([v[g] * m for g, m in zip(present, means, strict=True)]) / sum(
            v[g] for g in present
        )
    if reduction == "max":
        return tf.reduce_max(tf.stack(means))
    logits = tf.stack(
        [
            tf.stop_gradient(m) / temperature + np.log(v[g])
            for g, m in zip(present, means, strict=True)
        ]
    )
    return tf.reduce_sum(tf.nn.softmax(logits) * tf.stack(means))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "reduction,temperature", [("mean", 1.0), ("max", 1.0), ("softmax", 0.3), ("softmax", 5.0)]
)
def test_reduction_value_and_gradient(case, reduction, temperature):
    y, pred, ids, sw = _data()
    gw = case["group_weights"]
    loss_fn = GroupedMeanAbsoluteError(
        G, group_weights=gw, group_reduction=reduction, temperature=temperature
    )
    y_true = tf.constant(pack_targets(y, ids))
    p = tf.Variable(pred)
    with tf.GradientTape() as tape:
        got = loss_fn(y_true, p, sample_weight=sw)
    grad = tape.gradient(got, p)
    want = _numpy_loss(_numpy_group_means(y, pred, ids, sw), reduction, gw, temperature)
    assert float(got) == pytest.approx(want, rel=1e-6)

    p2 = tf.Variable(pred)
    with tf.GradientTape() as tape:
        ref = _independent_tf_loss(y, p2, ids, sw, reduction, gw, temperature)
    want_grad = tape.gradient(ref, p2)
    diff = float(np.max(np.abs(grad.numpy() - want_grad.numpy())))
    print(f"[measured] reduction {reduction} T={temperature} gw={gw is not None} grad: {diff:.3e}")
    np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-5, atol=1e-7)


def test_softmax_limits_are_max_and_mean():
    y, pred, ids, sw = _data(seed=3)
    y_true = pack_targets(y, ids)

    def loss(reduction, t=1.0):
        fn = GroupedMeanAbsoluteError(G, group_reduction=reduction, temperature=t)
        return float(fn(y_true, pred, sample_weight=sw))

    assert loss("softmax", 1e-4) == pytest.approx(loss("max"), rel=1e-6)
    assert loss("softmax", 1e5) == pytest.approx(loss("mean"), rel=1e-4)
    assert loss("mean") < loss("softmax", 0.2) < loss("max")


@pytest.mark.parametrize("reduction", ["mean", "max", "softmax"])
def test_no_present_group_gives_zero(reduction):
    fn = GroupedMeanAbsoluteError(3, group_reduction=reduction)
    p = tf.Variable(np.ones((3, 1), np.float32))
    with tf.GradientTape() as tape:
        got = fn(pack_targets(np.zeros(3), np.array([-1, -1, -1])), p)
    assert float(got) == 0.0
    g = tape.gradient(got, p)
    assert g is None or np.all(g.numpy() == 0)
