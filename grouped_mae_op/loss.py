"""Keras loss: grouped mean absolute error, with the group ids packed into y_true.

Keras hands a loss only (y_true, y_pred, sample_weight), so the group id of each row
travels as y_true's last column::

    y_true = pack_targets(y, group_ids)          # [N, k + 1]: k target columns, then the id
    model.compile(optimizer="adam", loss=GroupedMeanAbsoluteError(num_groups=100))
    model.fit(x, y_true, sample_weight=w)        # w is the per-row weight inside each group

Under tf.distribute the loss is the grouped MAE of the *global* batch (see
`grouped_mae_op.distribute`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from grouped_mae_op import distribute, ops, reference

ID_LIMIT = 2**24  # float32 holds every integer below this exactly
REDUCTIONS = ("mean", "max", "softmax")


def pack_targets(y, group_ids):
    """[N, k + 1] float32 y_true for the grouped loss and metric: y's columns, then the id.

    A 1-D y becomes one column. Ids must be integers with |id| < 2^24 (exact in float32);
    negative ids mark rows to ignore. Works on numpy arrays (returns numpy) and tensors.
    """
    if tf.is_tensor(y) or tf.is_tensor(group_ids):
        y = tf.convert_to_tensor(y)
        ids = tf.convert_to_tensor(group_ids)
        if not (ids.dtype.is_integer or ids.dtype.is_floating):
            raise TypeError(f"group_ids must be numeric, got {ids.dtype.name}")
        dtype = tf.float64 if y.dtype == tf.float64 else tf.float32
        y = tf.cast(y, dtype)
        y = tf.reshape(y, [-1, 1]) if y.shape.rank == 1 else y
        if y.shape.rank != 2:
            raise ValueError(f"y must have shape [N] or [N, k], got {y.shape}")
        if ids.shape.rank != 1:
            raise ValueError(f"group_ids must have shape [N], got {ids.shape}")
        static = tf.get_static_value(ids)
        if static is not None:
            _check_ids_numpy(np.asarray(static), "group_ids")
        return tf.concat([y, tf.cast(ids, dtype)[:, None]], axis=1)
    y = np.asarray(y)
    ids = np.asarray(group_ids)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"y must have shape [N] or [N, k], got {y.shape}")
    if ids.ndim != 1 or ids.shape[0] != y.shape[0]:
        raise ValueError(f"group_ids must have shape [N] = [{y.shape[0]}], got {ids.shape}")
    _check_ids_numpy(ids, "group_ids")
    dtype = np.float64 if y.dtype == np.float64 else np.float32
    return np.concatenate([y.astype(dtype), ids.astype(dtype)[:, None]], axis=1)


def _check_ids_numpy(ids: np.ndarray, name: str) -> None:
    if ids.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got {ids.dtype}")
    values = ids.astype(np.float64)
    bad = np.flatnonzero(~((values == np.round(values)) & (np.abs(values) < ID_LIMIT)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {ids[i].item()} is not a valid group id: ids must be integers with "
            f"|id| < 2^24 so that float32 holds them exactly"
        )


def _in_xla() -> bool:
    """Whether the code being traced will be compiled by XLA (tf.function(jit_compile=True))."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def unpack_targets(y_true, y_pred, sample_weight=None):
    """(targets [N, k], predictions [N, k], int32 ids [N], ids_ok [N], sample_weight [N] or
    None) from packed y_true. Rows whose id is not valid get id -1 and ids_ok False.

    y_pred is flattened to [N, k] (the per-row error is the mean over its non-batch axes,
    so flattening changes nothing); y_true must be [N, k + 1]. Ids that are not integers
    below 2^24 raise (ValueError when the values are known now, InvalidArgumentError at
    run time); under XLA, where nothing can raise on data, they make the loss NaN.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.shape.rank is None or y_pred.shape.rank == 0:
        raise ValueError(f"y_pred must have a batch axis, got shape {y_pred.shape}")
    y_true = tf.convert_to_tensor(y_true)
    if not y_true.dtype.is_floating:
        y_true = tf.cast(y_true, tf.float32)
    elif y_true.dtype in (tf.float16, tf.bfloat16):
        y_true = tf.cast(y_true, tf.float32)  # ids above 2048 (fp16) / 256 (bf16) are lost
    if y_true.shape.rank != 2:
        raise ValueError(
            f"y_true must be [N, k + 1] (targets, then the group id column; build it with "
            f"pack_targets(y, group_ids)), got shape {y_true.shape}"
        )
    if y_pred.shape.rank == 1:
        flat_pred = y_pred[:, None]
    elif y_pred.shape.rank == 2:
        flat_pred = y_pred
    else:
        inner = y_pred.shape[1:]
        width = int(np.prod(inner)) if inner.is_fully_defined() else -1
        flat_pred = tf.reshape(y_pred, [tf.shape(y_pred)[0], width])
    k = flat_pred.shape[1]
    cols = y_true.shape[1]
    if k is not None and cols is not None and cols != k + 1:
        hint = (
            " (y_true has no group id column: build it with pack_targets(y, group_ids))"
            if cols == k
            else ""
        )
        raise ValueError(
            f"y_true must have k + 1 = {k + 1} columns for y_pred with k = {k} values per row "
            f"(targets, then the group id), got y_true shape {y_true.shape}{hint}"
        )
    ids_f = y_true[:, -1]
    targets = tf.cast(y_true[:, :-1], flat_pred.dtype)
    ok = tf.logical_and(tf.equal(ids_f, tf.round(ids_f)), tf.abs(ids_f) < ID_LIMIT)
    static = tf.get_static_value(ids_f)
    if static is not None:
        _check_ids_numpy(np.asarray(static), "group id column of y_true")
    elif not _in_xla():
        first_bad = tf.where(tf.logical_not(ok))[:1, 0]  # empty when all are fine
        check = tf.debugging.Assert(
            tf.reduce_all(ok),
            [
                "y_true's last column must hold integer group ids with |id| < 2^24; row",
                first_bad,
                "has",
                tf.gather(ids_f, first_bad),
            ],
            name="check_group_ids",
        )
        with tf.control_dependencies([check]):
            ids_f = tf.identity(ids_f)
    ids = tf.cast(tf.where(ok, ids_f, -tf.ones_like(ids_f)), tf.int32)
    if sample_weight is not None:
        sample_weight = tf.convert_to_tensor(sample_weight)
        if sample_weight.shape.rank is not None and sample_weight.shape.rank > 1:
            sample_weight = tf.reshape(sample_weight, [-1])
        sample_weight = tf.cast(sample_weight, flat_pred.dtype)
    return targets, flat_pred, ids, ok, sample_weight


def reduce_groups(sums, weights, reduction="mean", group_weights=None, temperature=1.0):
    """Loss from per-group sums S and weights W; groups with W = 0 are absent (excluded).

    mean:    sum v_g m_g / sum v_g over present groups, m_g = S_g / W_g (v_g = 1 if not given)
    max:     max of m_g over present groups with v_g > 0 (the worst group)
    softmax: sum p_g m_g with p = softmax over present groups of m_g / T + log v_g; p is a
             constant in the gradient (as group DRO treats its group weights), so every
             group's error is pushed down, the worst ones hardest. T -> 0 gives max,
             T -> inf gives mean.
    Each is 0 when no group is present (with v_g > 0).
    """
    if reduction == "mean":
        return reference.finalize(sums, weights, group_weights)
    v = tf.ones_like(sums) if group_weights is None else tf.cast(group_weights, sums.dtype)
    present = tf.logical_and(tf.not_equal(weights, 0), v > 0)
    any_present = tf.reduce_any(present)
    means = sums / tf.where(present, weights, tf.ones_like(weights))
    if reduction == "max":
        lowest = tf.fill(tf.shape(means), tf.constant(-np.inf, means.dtype))
        worst = tf.reduce_max(tf.where(present, means, lowest))
        return tf.where(any_present, worst, tf.zeros_like(worst))
    if reduction == "softmax":
        logits = tf.stop_gradient(means) / tf.cast(temperature, means.dtype)
        logits += tf.math.log(tf.where(present, v, tf.ones_like(v)))
        logits = tf.where(present, logits, tf.fill(tf.shape(logits), -np.inf))
        p = tf.nn.softmax(tf.where(any_present, logits, tf.zeros_like(logits)))
        p = tf.where(present, p, tf.zeros_like(p))
        return tf.reduce_sum(p * means)
    raise ValueError(f"group_reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_config(num_groups, group_weights, group_reduction, temperature):
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
            raise TypeError(f"num_groups must be an int or None, got {num_groups!r}")
        if num_groups <= 0:
            raise ValueError(f"num_groups must be positive, got {num_groups}")
    if group_weights is not None:
        gw = np.asarray(group_weights, dtype=np.float64)
        if gw.ndim != 1:
            raise ValueError(f"group_weights must be 1-D, got shape {gw.shape}")
        if num_groups is None:
            raise ValueError("group_weights needs num_groups (its length)")
        if gw.shape[0] != num_groups:
            raise ValueError(
                f"group_weights must have num_groups = {num_groups} entries, got {gw.shape[0]}"
            )
        bad = np.flatnonzero(~(gw >= 0) | ~np.isfinite(gw))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"group_weights[{i}] = {gw[i]} is invalid: weights must be >= 0")
    if group_reduction not in REDUCTIONS:
        raise ValueError(f"group_reduction must be one of {REDUCTIONS}, got {group_reduction!r}")
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


@keras.saving.register_keras_serializable(package="grouped_mae_op.loss")
class GroupedMeanAbsoluteError(keras.losses.Loss):
    """Grouped mean absolute error: every group counts, however few rows it has.

    With e_i the row's mean absolute error, w_i its sample weight (from `fit`/`evaluate`'s
    `sample_weight`, 1 when not given), S_g = sum_{i in g} w_i e_i, W_g = sum_{i in g} w_i
    and m_g = S_g / W_g for the groups present in the batch (W_g > 0)::

        "mean":    sum_g v_g m_g / sum_g v_g        (the fused op; v = group_weights or 1)
        "max":     max_g m_g                        (the worst group)
        "softmax": sum_g softmax(m / T + log v)_g m_g   (a smooth worst group)

    y_true is `pack_targets(y, group_ids)`: y's columns, then the group id; negative ids
    mark rows to ignore. `sample_weight` becomes the per-row weight inside the groups (it is
    not multiplied onto the loss afterwards, as Keras does for other losses).

    Under tf.distribute (MirroredStrategy in `fit`, MultiWorkerMirroredStrategy in a custom
    loop) the per-group sums and weights are all-reduced across replicas, so the loss and
    the applied update are those of the global batch.

    num_groups=None takes max(id) + 1 from each batch; that count depends on the data, which
    XLA cannot compile, so under `jit_compile=True` (Keras' default for `fit` on a GPU) it
    raises a ValueError asking for num_groups. The reductions other than "mean" and the
    distributed path also need a fixed num_groups (each batch must see the same groups).

        model.compile(optimizer="adam", loss=GroupedMeanAbsoluteError(num_groups=100))
    """

    def __init__(
        self,
        num_groups=None,
        group_weights=None,
        group_reduction="mean",
        temperature=1.0,
        name="grouped_mae",
        dtype=None,
    ):
        _check_config(num_groups, group_weights, group_reduction, temperature)
        super().__init__(name=name, reduction=None, dtype=dtype)
        self.num_groups = None if num_groups is None else int(num_groups)
        self.group_weights = (
            None if group_weights is None else [float(w) for w in np.asarray(group_weights)]
        )
        self.group_reduction = group_reduction
        self.temperature = float(temperature)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Replaces Loss.__call__, which would multiply sample_weight onto the finished loss.
        with tf.name_scope(self.name):
            y_pred = tf.convert_to_tensor(y_pred)
            if y_pred.dtype != self.dtype:
                y_pred = tf.cast(y_pred, self.dtype)
            return self.call(y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred, sample_weight=None):
        targets, pred, ids, ids_ok, sw = unpack_targets(y_true, y_pred, sample_weight)
        num_groups = self.num_groups
        if num_groups is None:
            if _in_xla():
                raise ValueError(
                    "GroupedMeanAbsoluteError(num_groups=None) cannot run under XLA "
                    "(jit_compile=True, Keras' default for fit on a GPU): the group count "
                    "would depend on the data. Pass num_groups=<number of groups>, or "
                    "compile the model with jit_compile=False."
                )
            if self.group_reduction != "mean" or distribute.replica_context() is not None:
                raise ValueError(
                    f"GroupedMeanAbsoluteError(group_reduction={self.group_reduction!r}) "
                    "needs num_groups under tf.distribute and for the 'max' and 'softmax' "
                    "reductions: pass num_groups=<number of groups>"
                )
        gw = None if self.group_weights is None else tf.constant(self.group_weights, pred.dtype)
        ctx = distribute.replica_context()
        if self.group_reduction == "mean" and ctx is None:
            loss = ops.grouped_mae(
                targets, pred, ids, num_groups, sample_weight=sw, group_weights=gw
            )
        else:
            sums, weights = ops.grouped_mae_stats(targets, pred, ids, num_groups, sample_weight=sw)
            sums, weights, replicas = distribute.all_reduce_group_stats(sums, weights)
            loss = reduce_groups(sums, weights, self.group_reduction, gw, self.temperature)
            loss = tf.cast(loss, pred.dtype)
            if replicas > 1:
                # Each replica returns 1/R of the global loss, as Keras scales every loss
                # under tf.distribute; see grouped_mae_op.distribute for the gradient.
                loss = loss / tf.cast(replicas, loss.dtype)
        # Bad ids cannot raise under XLA: they poison the loss instead of being dropped.
        return tf.where(tf.reduce_all(ids_ok), loss, tf.constant(np.nan, loss.dtype))

    def get_config(self):
        return {
            "num_groups": self.num_groups,
            "group_weights": self.group_weights,
            "group_reduction": self.group_reduction,
            "temperature": self.temperature,
            "name": self.name,
            "dtype": self.dtype,
        }


GroupedMAE = GroupedMeanAbsoluteError
