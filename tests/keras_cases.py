"""Shared data, models and the hand-written reference train step for the Keras tests.

The reference step is a plain GradientTape step on the pure-TF reference loss
(`grouped_mae_op.reference`), with SGD written out by hand (w <- w - lr * grad).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from grouped_mae_op import reference
from grouped_mae_op.loss import pack_targets

NUM_GROUPS = 6
LR = 0.5


def grouped_data(n=48, features=3, targets=1, seed=0):
    """Rows with unequal group sizes, an absent group (4) and ignored rows (id -1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.normal(size=(n, targets)).astype(np.float32)
    ids = rng.choice([0, 0, 0, 0, 0, 1, 1, 2, 3, 5, -1], size=n).astype(np.int32)
    sw = rng.uniform(0.2, 2.0, size=n).astype(np.float32)
    return x, y, ids, sw


def make_model(features=3, targets=1, seed=1):
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((features,))
    hidden = keras.layers.Dense(5, activation="tanh", kernel_initializer=init)(inputs)
    outputs = keras.layers.Dense(targets, kernel_initializer=init, dtype="float32")(hidden)
    return keras.Model(inputs, outputs)


def reference_loss(model, x, y, ids, sw=None, num_groups=NUM_GROUPS, **kw):
    pred = tf.cast(model(x, training=True), tf.float32)
    return reference.grouped_mae(y, pred, ids, num_groups, sample_weight=sw, **kw)


def reference_step(model, x, y, ids, sw=None, lr=LR, loss_fn=None):
    """(loss before the step, weights after one hand-written SGD step)."""
    with tf.GradientTape() as tape:
        if loss_fn is None:
            loss = reference_loss(model, x, y, ids, sw)
        else:
            loss = loss_fn(tf.cast(model(x, training=True), tf.float32))
    grads = tape.gradient(loss, model.trainable_weights)
    new = [w.numpy() - lr * g.numpy() for w, g in zip(model.trainable_weights, grads, strict=True)]
    return float(loss), new


def max_weight_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b, strict=True)
    )


def packed(y, ids):
    return pack_targets(y, ids)


def report(label, value):
    """Print a measured difference (visible with pytest -s; collected for the docs)."""
    print(f"[measured] {label}: {value:.3e}")
