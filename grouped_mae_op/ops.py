"""The fused grouped-MAE op: Python wrappers and gradients."""

from __future__ import annotations

import tensorflow as tf

from grouped_mae_op._checks import prepare, stats_dtype
from grouped_mae_op._loader import ops as _ops


def _or_empty(weights, dtype: tf.DType) -> tf.Tensor:
    """The op always takes its optional weight inputs; an empty tensor stands for "absent"."""
    return weights if weights is not None else tf.zeros([0], dtype)


def grouped_mae(
    y_true,
    y_pred,
    group_ids,
    num_groups=None,
    *,
    sample_weight=None,
    group_weights=None,
    name: str | None = None,
) -> tf.Tensor:
    """Grouped mean absolute error: the mean over groups of each group's MAE.

    With e_i = mean over the non-batch axes of |y_pred_i - y_true_i|, w_i the sample weight
    and v_g the group weight (1 when not given)::

        S_g = sum_{i in g} w_i e_i,   W_g = sum_{i in g} w_i,   g present when W_g > 0
        loss = sum_{present g} v_g S_g / W_g  /  sum_{present g} v_g

    The loss is 0 when no group is present (N = 0 included) or when the present groups'
    weights sum to 0.

    Args:
      y_true, y_pred: `[N]` or `[N, d1, ...]`, the same shape and float dtype (float16,
        bfloat16, float32 or float64).
      group_ids: `[N]` int32 or int64. A negative id marks a row to ignore; an id >=
        num_groups is an error (on the GPU and under XLA, where a kernel cannot raise, it
        makes the loss NaN instead).
      num_groups: positive int or scalar int tensor; `None` means max(group_ids) + 1 (at
        least 1). Pass it explicitly under `jit_compile=True`, where it must be constant.
      sample_weight: optional `[N]` per-row weights >= 0.
      group_weights: optional `[num_groups]` per-group weights >= 0.

    Returns:
      A scalar in y_pred's dtype. Accumulation is in float64 on the CPU (float64 also for
      float32 inputs on the GPU, float32 for 16-bit inputs there).

    Gradients flow to y_pred and (negated) to y_true; sign(0) = 0 as in tf.abs. group_ids,
    num_groups and both weights get no gradient (None).
    """
    with tf.name_scope(name or "grouped_mae"):
        a = prepare(y_true, y_pred, group_ids, num_groups, sample_weight, group_weights)
        dtype = a.y_pred.dtype
        loss, _ = _ops.grouped_mae(
            a.y_true,
            a.y_pred,
            a.group_ids,
            a.num_groups,
            _or_empty(a.sample_weight, dtype),
            _or_empty(a.group_weights, dtype),
            Tout=stats_dtype(dtype),
            has_sample_weight=a.sample_weight is not None,
            has_group_weights=a.group_weights is not None,
        )
        return loss


def grouped_mae_stats(
    y_true,
    y_pred,
    group_ids,
    num_groups=None,
    *,
    sample_weight=None,
    name: str | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-group sums S_g = sum w_i e_i and weights W_g = sum w_i, each of shape [num_groups].

    The building block for other aggregations over group means (worst group, softmax over
    groups, cross-replica reductions): a group's MAE is S_g / W_g where W_g > 0.
    Both are float32 for 16-bit and float32 inputs (16-bit would overflow at 65504), float64
    for float64. Differentiable with respect to y_pred and y_true through S; W gets no
    gradient. Arguments are as in `grouped_mae`.
    """
    with tf.name_scope(name or "grouped_mae_stats"):
        a = prepare(y_true, y_pred, group_ids, num_groups, sample_weight)
        dtype = a.y_pred.dtype
        sums, weights = _ops.grouped_mae_stats(
            a.y_true,
            a.y_pred,
            a.group_ids,
            a.num_groups,
            _or_empty(a.sample_weight, dtype),
            Tout=stats_dtype(dtype),
            has_sample_weight=a.sample_weight is not None,
        )
        return sums, weights


def _grad_op(op, sample_weight, group_scale, upstream):
    """GroupedMaeGrad on the (y_true, y_pred, ids) inputs of `op`, with its sample weights."""
    return _ops.grouped_mae_grad(
        op.inputs[0],
        op.inputs[1],
        op.inputs[2],
        sample_weight,
        group_scale,
        tf.cast(upstream, op.inputs[1].dtype),
        has_sample_weight=op.get_attr("has_sample_weight"),
    )


def _row_grad(op, group_scale, upstream):
    """[grad y_true, grad y_pred] for an op whose inputs start (y_true, y_pred, ids, ...)."""
    grad = _grad_op(op, op.inputs[4], group_scale, upstream)
    # In eager mode TF tells which input gradients nobody asked for; skip that negation.
    skip = getattr(op, "skip_input_indices", None) or ()
    return [None if 0 in skip else -grad, grad]


@tf.RegisterGradient("GroupedMae")
def _grouped_mae_grad(op, grad_loss, _grad_scale):
    return _row_grad(op, op.outputs[1], grad_loss) + [None] * 4


@tf.RegisterGradient("GroupedMaeStats")
def _grouped_mae_stats_grad(op, grad_sums, _grad_weights):
    if grad_sums is None:
        return [None] * 5
    one = tf.ones([], op.inputs[1].dtype)
    return _row_grad(op, grad_sums, one) + [None] * 3


@tf.RegisterGradient("GroupedMaeGrad")
def _grouped_mae_grad_grad(op, grad_grad):
    """Second order, for nested tapes (gradient penalties, Hessian-vector products).

    The op's output is upstream * scale[g] * w / D * sign(y_pred - y_true), 0 for an ignored
    row. In y_true and y_pred its derivative is zero almost everywhere (TF differentiates the
    sign inside tf.abs's gradient to zero too); in the group scales and in upstream it is
    linear. Sample weights and ids get none, as in the first order.
    """
    _, y_pred, ids, sample_weight, scale, upstream = op.inputs
    # w / D * sign(y_pred - y_true) per element: the op with every scale and upstream 1.
    unit = _grad_op(op, sample_weight, tf.ones_like(scale), tf.ones_like(upstream))
    per_element = tf.cast(grad_grad, scale.dtype) * tf.cast(unit, scale.dtype)
    per_row = tf.reduce_sum(per_element, axis=tf.range(1, tf.rank(per_element)))
    # Ignored rows (negative ids) are dropped by unsorted_segment_sum, and are 0 anyway.
    per_group = tf.math.unsorted_segment_sum(per_row, ids, tf.shape(scale)[0])
    grad_scale = per_group * tf.cast(upstream, scale.dtype)
    grad_upstream = tf.cast(tf.reduce_sum(per_group * scale), upstream.dtype)
    zeros = tf.zeros_like(y_pred)
    return [zeros, zeros, None, None, grad_scale, grad_upstream]
