"""The cross-replica path of the grouped loss, shared by `fit` and custom training loops.

A replica sees only its slice of the global batch, and a grouped MAE is not a sum of
per-slice losses (a group's mean divides by the group's *global* weight). So each replica
computes its per-group sums S and weights W, all-reduces them (SUM) with the other
replicas, and finalizes the global loss from the global S and W. TensorFlow defines the
gradient of an all-sum as the all-sum of the upstream gradients, so the gradient reaching
a replica's own S is the sum of what every replica sent back; dividing each replica's loss
by the number of replicas (what Keras does for every loss under tf.distribute) makes that
sum the single-device gradient, and the optimizer's cross-replica gradient sum then equals
the single-device gradient of the global batch.
"""

from __future__ import annotations

import tensorflow as tf


def replica_context():
    """The replica context when running inside `strategy.run` with more than one replica
    in sync, else None (no strategy, one replica, or a cross-replica context)."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def all_reduce_group_stats(sums: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, int]:
    """Sums per-group (S, W) over all replicas in sync; returns (S, W, num_replicas).

    Outside a multi-replica context this returns the inputs and 1. Gradients flow to the
    local `sums` through the all-reduce (its gradient is itself an all-sum). One collective
    carries both vectors.
    """
    ctx = replica_context()
    if ctx is None:
        return sums, weights, 1
    num_groups = tf.shape(sums)[0]
    both = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([sums, weights], axis=0))
    return both[:num_groups], both[num_groups:], ctx.num_replicas_in_sync
