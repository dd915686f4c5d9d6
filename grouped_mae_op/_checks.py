"""Argument conversion and validation shared by the op wrappers and the pure-TF reference.

Static problems (dtypes, known shapes, known values) raise TypeError or ValueError here,
naming the argument and the value. What is only known at run time is checked by the op
kernel (tf.errors.InvalidArgumentError) or, in the reference, by tf.debugging asserts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
ID_DTYPES = (tf.int32, tf.int64)
INT32_MAX = 2**31 - 1


def stats_dtype(dtype: tf.DType) -> tf.DType:
    """dtype of the per-group sums and weights: float64 for float64 inputs, else float32."""
    return tf.float64 if dtype == tf.float64 else tf.float32


class Args(NamedTuple):
    y_true: tf.Tensor
    y_pred: tf.Tensor
    group_ids: tf.Tensor
    num_groups: tf.Tensor  # scalar int32 or int64
    sample_weight: tf.Tensor | None
    group_weights: tf.Tensor | None


def _names(dtypes) -> str:
    return ", ".join(d.name for d in dtypes)


def _to_tensor(value, name: str, dtype_hint=None) -> tf.Tensor:
    try:
        return tf.convert_to_tensor(value, dtype_hint=dtype_hint, name=name)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} could not be converted to a tensor: {err}") from err


def _explicit_dtype(value) -> bool:
    # Tensors and numpy arrays/scalars carry a dtype the user chose: keep it (and reject it
    # if it is wrong) rather than converting silently. Lists and Python numbers take the hint.
    return isinstance(value, (tf.Tensor, tf.Variable, np.ndarray, np.generic))


def _hint(value, dtype: tf.DType):
    return None if _explicit_dtype(value) else dtype


def _check_float(t: tf.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {_names(FLOAT_DTYPES)}, got {t.dtype.name}")


def _weights(
    value, name: str, dtype: tf.DType, length, length_name: str, counted=True
) -> tf.Tensor:
    """counted: which entries must be >= 0 (a bool mask), True for all, None when unknown."""
    w = _to_tensor(value, name, dtype_hint=dtype)
    if not (w.dtype.is_floating or w.dtype.is_integer):
        raise TypeError(f"{name} must be a numeric tensor, got {w.dtype.name}")
    if w.shape.rank is not None and w.shape.rank != 1:
        raise ValueError(f"{name} must have shape [{length_name}], got shape {w.shape}")
    if length is not None and w.shape[0] is not None and w.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length_name}] = [{length}], got {w.shape}")
    static = tf.get_static_value(w) if counted is not None else None
    if static is not None:
        bad = np.flatnonzero(~(np.asarray(static, dtype=np.float64) >= 0) & counted)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] = {static[i]} is invalid: weights must be >= 0")
    return tf.cast(w, dtype) if w.dtype != dtype else w


def num_groups_tensor(num_groups, group_ids: tf.Tensor) -> tf.Tensor:
    if num_groups is None:
        # (ids are [N] here, or of unknown rank inside a tf.function: reduce to a scalar.)
        top = tf.reduce_max(group_ids)
        return tf.maximum(tf.cast(top, tf.int64) + 1, tf.constant(1, tf.int64))
    if isinstance(num_groups, (bool, np.bool_)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    if isinstance(num_groups, (int, np.integer)):
        g = int(num_groups)
        if g <= 0:
            raise ValueError(f"num_groups must be positive, got {g}")
        if g > INT32_MAX:
            raise ValueError(f"num_groups = {g} is too large (at most {INT32_MAX})")
        return tf.constant(g, tf.int32)
    t = _to_tensor(num_groups, "num_groups")
    if t.dtype not in ID_DTYPES:
        raise TypeError(f"num_groups must be an int32 or int64 scalar, got {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != 0:
        raise ValueError(f"num_groups must be a scalar, got shape {t.shape}")
    static = tf.get_static_value(t)
    if static is not None and int(static) <= 0:
        raise ValueError(f"num_groups must be positive, got {int(static)}")
    return t


def prepare(y_true, y_pred, group_ids, num_groups, sample_weight, group_weights=None) -> Args:
    y_pred = _to_tensor(y_pred, "y_pred", dtype_hint=_hint(y_pred, tf.float32))
    _check_float(y_pred, "y_pred")
    y_true = _to_tensor(y_true, "y_true", dtype_hint=_hint(y_true, y_pred.dtype))
    _check_float(y_true, "y_true")
    if y_true.dtype != y_pred.dtype:
        raise TypeError(
            f"y_true and y_pred must have the same dtype, got y_true {y_true.dtype.name} and "
            f"y_pred {y_pred.dtype.name}"
        )
    for t, name in ((y_true, "y_true"), (y_pred, "y_pred")):
        if t.shape.rank == 0:
            raise ValueError(f"{name} must have a batch axis (rank >= 1), got a scalar")
    if not y_true.shape.is_compatible_with(y_pred.shape):
        raise ValueError(
            f"y_true and y_pred must have the same shape, got {y_true.shape} and {y_pred.shape}"
        )
    ids = _to_tensor(group_ids, "group_ids", dtype_hint=_hint(group_ids, tf.int32))
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"group_ids must be int32 or int64, got {ids.dtype.name}")
    if ids.shape.rank is not None and ids.shape.rank != 1:
        raise ValueError(f"group_ids must have shape [N], got shape {ids.shape}")
    n = y_pred.shape[0] if y_pred.shape.rank else None
    if n is None and y_true.shape.rank:
        n = y_true.shape[0]
    if n is not None and ids.shape.rank == 1 and ids.shape[0] is not None and ids.shape[0] != n:
        raise ValueError(
            f"group_ids has {ids.shape[0]} entries but y_true/y_pred have N = {n} rows"
        )
    g = num_groups_tensor(num_groups, ids)
    static_ids = tf.get_static_value(ids)
    static_g = tf.get_static_value(g)
    if static_ids is not None and static_g is not None and static_ids.size:
        bad = np.flatnonzero(static_ids >= static_g)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"group_ids[{i}] = {static_ids[i]} is out of range: ids must be < num_groups = "
                f"{int(static_g)} (negative ids mark rows to ignore)"
            )
    sw = None
    if sample_weight is not None:
        # Padding rows (id < 0) are ignored with their weights, as in the kernels; when the
        # ids are only known at run time the kernel checks the weights.
        counted = None
        if static_ids is not None and static_ids.ndim == 1:
            counted = static_ids >= 0
            if n is not None and counted.size != n:
                counted = None
        sw = _weights(sample_weight, "sample_weight", y_pred.dtype, n, "N", counted)
    gw = None
    if group_weights is not None:
        gw = _weights(
            group_weights,
            "group_weights",
            y_pred.dtype,
            int(static_g) if static_g is not None else None,
            "num_groups",
        )
    return Args(y_true, y_pred, ids, g, sw, gw)
