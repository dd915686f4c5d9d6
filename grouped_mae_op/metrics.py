"""Keras metric: the grouped MAE over everything seen in an epoch (not a mean of batch values)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from grouped_mae_op import ops, reference
from grouped_mae_op.loss import _check_config, unpack_targets


@keras.saving.register_keras_serializable(package="grouped_mae_op.metrics")
class GroupedMeanAbsoluteError(keras.metrics.Metric):
    """Grouped MAE accumulated over batches: per-group sums S_g = sum w_i e_i and weights
    W_g = sum w_i are kept (float64) across `update_state` calls, and

        result() = sum_g v_g S_g / W_g / sum_g v_g     over groups seen (W_g > 0)

    y_true is `pack_targets(y, group_ids)` as for the loss. The state variables are summed
    across replicas when read, so the result is right under MirroredStrategy; Keras resets
    them at every epoch.

        model.compile(loss=..., metrics=[GroupedMeanAbsoluteError(num_groups=100)])
    """

    def __init__(self, num_groups, group_weights=None, name="grouped_mae", dtype=None):
        if num_groups is None:
            raise ValueError("the grouped MAE metric needs num_groups (its state size)")
        _check_config(num_groups, group_weights, "mean", 1.0)
        super().__init__(name=name, dtype=dtype)
        self.num_groups = int(num_groups)
        self.group_weights = (
            None if group_weights is None else [float(w) for w in np.asarray(group_weights)]
        )
        self.group_sums = self.add_variable(
            shape=(self.num_groups,), initializer="zeros", dtype="float64", name="group_sums"
        )
        self.group_weight_sums = self.add_variable(
            shape=(self.num_groups,),
            initializer="zeros",
            dtype="float64",
            name="group_weight_sums",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.dtype in (tf.float16, tf.bfloat16):
            y_pred = tf.cast(y_pred, tf.float32)
        targets, pred, ids, ids_ok, sw = unpack_targets(y_true, y_pred, sample_weight)
        sums, weights = ops.grouped_mae_stats(targets, pred, ids, self.num_groups, sample_weight=sw)
        sums = tf.cast(sums, tf.float64)
        weights = tf.cast(weights, tf.float64)
        # Under XLA bad ids cannot raise; they poison the sums instead of being dropped.
        sums = tf.where(tf.reduce_all(ids_ok), sums, tf.constant(np.nan, tf.float64))
        self.group_sums.assign_add(sums)
        self.group_weight_sums.assign_add(weights)

    def result(self):
        gw = None if self.group_weights is None else tf.constant(self.group_weights, tf.float64)
        loss = reference.finalize(
            tf.convert_to_tensor(self.group_sums), tf.convert_to_tensor(self.group_weight_sums), gw
        )
        return tf.cast(loss, self.dtype)

    def group_results(self):
        """Per-group MAE S_g / W_g over everything seen, NaN for groups not seen (float64)."""
        sums = tf.convert_to_tensor(self.group_sums)
        weights = tf.convert_to_tensor(self.group_weight_sums)
        seen = tf.not_equal(weights, 0)
        safe = tf.where(seen, weights, tf.ones_like(weights))
        return tf.where(seen, sums / safe, tf.constant(np.nan, tf.float64))

    def get_config(self):
        return {
            "num_groups": self.num_groups,
            "group_weights": self.group_weights,
            "name": self.name,
            "dtype": self.dtype,
        }


GroupedMAE = GroupedMeanAbsoluteError
