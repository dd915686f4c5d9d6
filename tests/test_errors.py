"""Bad input gives a clear error that names the argument and the value, never a crash.

Each case runs twice: eagerly with concrete inputs (checked in Python, ValueError or
TypeError) and inside a tf.function whose inputs have unknown shapes, so that the kernel's
own validation (InvalidArgumentError) is what answers. Dtype errors are found while
tracing, so they are ValueError/TypeError in both paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import grouped_mae_op as gm

F32, F64, I32, I64 = np.float32, np.float64, np.int32, np.int64
NAN = float("nan")
STATIC = (ValueError, TypeError)
KERNEL = tf.errors.InvalidArgumentError


def arr(values, dtype=F32):
    return np.asarray(values, dtype)


# name: (inputs, error in eager mode, error in a shape-agnostic tf.function, fragments that
# the message must contain). Inputs are keyword arguments of grouped_mae; unset ones default
# to y_true = y_pred = [0, 1, 2] (float32), group_ids = [0, 1, 0], num_groups = 2.
BAD_INPUTS = {
    "mismatched_shapes": (
        dict(y_true=arr([0, 1, 2]), y_pred=arr([0, 1, 2, 3])),
        STATIC,
        KERNEL,
        ["y_true", "y_pred", "3", "4"],
    ),
    "mismatched_row_shapes": (
        dict(y_true=arr([[0, 1]] * 3), y_pred=arr([[0, 1, 2]] * 3)),
        STATIC,
        KERNEL,
        ["same shape", "2", "3"],
    ),
    "scalar_targets": (
        dict(y_true=arr(1.0), y_pred=arr(2.0), group_ids=arr([0], I32)),
        STATIC,
        KERNEL,
        ["y_true", "batch axis", "scalar"],
    ),
    "ids_of_rank_2": (
        dict(group_ids=arr([[0, 1, 0]], I32)),
        STATIC,
        KERNEL,
        ["group_ids", "[N]", "1", "3"],
    ),
    "ids_of_wrong_length": (
        dict(group_ids=arr([0, 1], I32)),
        STATIC,
        KERNEL,
        ["group_ids", "2", "N = 3"],
    ),
    "empty_rows": (
        dict(y_true=np.zeros((3, 0), F32), y_pred=np.zeros((3, 0), F32)),
        KERNEL,
        KERNEL,
        ["at least one element", "[3,0]"],
    ),
    "int_targets": (
        dict(y_true=arr([0, 1, 2], I32), y_pred=arr([0, 1, 2], I32)),
        TypeError,
        TypeError,
        ["y_pred", "int32"],
    ),
    "mixed_float_dtypes": (
        dict(y_true=arr([0, 1, 2], F64)),
        TypeError,
        TypeError,
        ["y_true", "float64", "y_pred", "float32"],
    ),
    "float_ids": (
        dict(group_ids=arr([0, 1, 0], F32)),
        TypeError,
        TypeError,
        ["group_ids", "float32"],
    ),
    "num_groups_zero": (dict(num_groups=0), ValueError, KERNEL, ["num_groups", "positive", "0"]),
    "num_groups_negative": (
        dict(num_groups=-3),
        ValueError,
        KERNEL,
        ["num_groups", "positive", "-3"],
    ),
    "num_groups_too_large": (
        dict(num_groups=2**31),
        ValueError,
        KERNEL,
        ["num_groups", "2147483648", "too large"],
    ),
    "num_groups_far_too_large_int64": (
        dict(num_groups=np.int64(2**40)),
        ValueError,
        KERNEL,
        ["num_groups", str(2**40), "too large"],
    ),
    "num_groups_not_scalar": (
        dict(num_groups=arr([2, 3], I32)),
        ValueError,
        KERNEL,
        ["num_groups", "scalar"],
    ),
    "num_groups_float": (dict(num_groups=2.5), TypeError, TypeError, ["num_groups", "float"]),
    "id_too_large_int32": (
        dict(group_ids=arr([0, 2, 1], I32)),
        ValueError,
        KERNEL,
        ["group_ids[1] = 2", "num_groups = 2"],
    ),
    "id_too_large_int64": (
        dict(group_ids=arr([0, 1, 2**40], I64)),
        ValueError,
        KERNEL,
        [f"group_ids[2] = {2**40}", "num_groups = 2"],
    ),
    "sample_weight_wrong_length": (
        dict(sample_weight=arr([1, 1])),
        ValueError,
        KERNEL,
        ["sample_weight", "[N] = [3]", "2"],
    ),
    "sample_weight_of_rank_2": (
        dict(sample_weight=arr([[1, 1, 1]])),
        ValueError,
        KERNEL,
        ["sample_weight", "[N]"],
    ),
    "sample_weight_negative": (
        dict(sample_weight=arr([1, -1, 1])),
        ValueError,
        KERNEL,
        ["sample_weight[1] = -1", ">= 0"],
    ),
    "sample_weight_nan": (
        dict(sample_weight=arr([1, 1, NAN])),
        ValueError,
        KERNEL,
        ["sample_weight[2] = nan", ">= 0"],
    ),
    "group_weights_wrong_length": (
        dict(group_weights=arr([1, 1, 1])),
        ValueError,
        KERNEL,
        ["group_weights", "[num_groups] = [2]", "3"],
    ),
    "group_weights_negative": (
        dict(group_weights=arr([1, -0.5])),
        ValueError,
        KERNEL,
        ["group_weights[1] = -0.5", ">= 0"],
    ),
    "group_weights_nan": (
        dict(group_weights=arr([NAN, 1])),
        ValueError,
        KERNEL,
        ["group_weights[0] = nan", ">= 0"],
    ),
}

DEFAULTS = dict(
    y_true=arr([0, 1, 2]), y_pred=arr([0, 1, 2]), group_ids=arr([0, 1, 0], I32), num_groups=2
)
ARG_ORDER = ("y_true", "y_pred", "group_ids", "num_groups", "sample_weight", "group_weights")


def full_inputs(overrides: dict) -> dict:
    return {**DEFAULTS, **overrides}


def call(fn, inputs: dict):
    kw = {k: v for k, v in inputs.items() if k in ("sample_weight", "group_weights")}
    return fn(inputs["y_true"], inputs["y_pred"], inputs["group_ids"], inputs["num_groups"], **kw)


def call_in_function(fn, inputs: dict, with_gradient: bool):
    """Runs fn in a tf.function whose every input (num_groups included) has unknown shape."""
    names = [k for k in ARG_ORDER if k in inputs]
    values = [tf.constant(inputs[k]) for k in names]
    signature = [tf.TensorSpec(None, v.dtype) for v in values]

    @tf.function(input_signature=signature)
    def f(*args):
        a = dict(zip(names, args, strict=True))
        with tf.GradientTape() as tape:
            tape.watch(a["y_pred"])
            out = call(fn, a)
            out = out if fn is gm.grouped_mae else tf.reduce_sum(out[0])
        if with_gradient:
            return out, tape.gradient(out, a["y_pred"])
        return out

    return f(*values)


def stats_fn(y_true, y_pred, ids, num_groups, **kw):
    return gm.grouped_mae_stats(y_true, y_pred, ids, num_groups, **kw)


def functions_for(inputs):
    # grouped_mae_stats takes no group_weights.
    yield gm.grouped_mae
    if "group_weights" not in inputs:
        yield stats_fn


def check_message(err: BaseException, fragments):
    message = str(err.message if isinstance(err, tf.errors.OpError) else err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_eager(name):
    overrides, eager_error, _, fragments = BAD_INPUTS[name]
    inputs = full_inputs(overrides)
    for fn in functions_for(inputs):
        with pytest.raises(eager_error) as info:
            call(fn, inputs)
        check_message(info.value, fragments)


@pytest.mark.parametrize("with_gradient", [False, True])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_in_tf_function(name, with_gradient):
    overrides, _, graph_error, fragments = BAD_INPUTS[name]
    inputs = full_inputs(overrides)
    if name == "num_groups_float":
        # A float num_groups cannot be passed as a tensor of unknown shape either.
        inputs["num_groups"] = np.float32(2.5)
    for fn in functions_for(inputs):
        with pytest.raises(graph_error) as info:
            call_in_function(fn, inputs, with_gradient)
        check_message(info.value, fragments)


@pytest.mark.parametrize("ids_dtype", [I32, I64])
def test_out_of_range_id_inside_tf_function_with_constant_num_groups(ids_dtype):
    # The common Keras case: num_groups a Python int, ids a run-time tensor.
    f = tf.function(lambda ids: gm.grouped_mae(tf.zeros([3]), tf.ones([3]), ids, 4))
    assert float(f(tf.constant([0, 3, 1], ids_dtype))) == 1.0
    with pytest.raises(KERNEL, match=r"group_ids\[2\] = 4 is out of range.*num_groups = 4"):
        f(tf.constant([0, 3, 4], ids_dtype))


def test_first_bad_row_is_reported_across_shards():
    # Bad rows in several forward shards: the lowest index is reported, whichever shard
    # finishes first.
    n = 1 << 17
    ids = np.zeros(n, np.int32)
    ids[[70_000, 5_000, 100_000]] = [9, 7, 8]
    f = tf.function(lambda ids: gm.grouped_mae(tf.zeros([n]), tf.ones([n]), ids, 2))
    with pytest.raises(KERNEL, match=r"group_ids\[5000\] = 7"):
        f(tf.constant(ids))


def test_negative_ids_are_not_errors_even_far_below_int32():
    ids = np.array([-(2**40), 0, -1], np.int64)
    loss = gm.grouped_mae([5.0, 1.0, 7.0], [0.0, 0.0, 0.0], ids, 1)
    assert float(loss) == 1.0


def test_num_groups_none_with_out_of_int32_range_id_is_rejected():
    # max(id) + 1 = 2^40 groups cannot be allocated: refused before any allocation.
    with pytest.raises((ValueError, KERNEL), match="num_groups"):
        gm.grouped_mae([1.0], [2.0], np.array([2**40], np.int64))


def test_num_groups_too_large_to_allocate_is_a_resource_error_not_a_crash():
    # 2^31 - 1 groups pass the range check but need 48 GiB of [G] buffers. In a subprocess
    # whose address space is capped 4 GiB above what TF already uses, the allocation fails
    # and TF raises ResourceExhaustedError naming the shape; the process survives.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, resource
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        import grouped_mae_op as gm
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))
        for fn in (gm.grouped_mae, gm.grouped_mae_stats):
            try:
                fn(tf.zeros([3]), tf.ones([3]), tf.constant([0, 1, 2]), 2**31 - 1)
                print("no error")
            except tf.errors.ResourceExhaustedError as err:
                print("OOM" if "2147483647" in err.message or "4294967294" in err.message
                      else err.message)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["OOM", "OOM"], out.stdout
