"""Fuzzing (hypothesis): valid and invalid inputs of every kind, eager and in tf.function,
with and without a gradient. Every case either equals the float64 formula and the pure-TF
reference, or raises ValueError / TypeError / InvalidArgumentError naming a bad argument.

Example counts come from the hypothesis profile (tests/conftest.py): "ci" (the default,
2,000 fuzz examples here) or "fuzz" (`make fuzz`, 20x more, random seeds).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from cases import FLOAT_DTYPES, LOSS_RTOL, as_float64, formula_grad, formula_loss
from hypothesis import event, given, settings
from hypothesis import strategies as st

import grouped_mae_op as gm
from grouped_mae_op import reference

INT32_MAX = 2**31 - 1
CLEAR_ERRORS = (ValueError, TypeError, tf.errors.InvalidArgumentError)
GRAD_RTOL = LOSS_RTOL["reference"]
ATOL = {tf.float16: 6e-8, tf.bfloat16: 0.0, tf.float32: 0.0, tf.float64: 0.0}
PER_EXAMPLE = settings.default.max_examples  # 100 in "ci", 2000 in "fuzz"


@st.composite
def fuzz_inputs(draw):
    """Inputs of grouped_mae, often invalid in one or more ways, as numpy arrays / tensors."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    # Most draws are valid in each respect; the rare corruptions combine to about half.
    true_dtype = draw(st.sampled_from([dtype] * 38 + [tf.float64, tf.int32]))
    pred_dtype = draw(st.sampled_from([dtype] * 39 + [tf.int64]))
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17, 40]))
    rank = draw(st.sampled_from([1] * 6 + [2] * 4 + [3] * 2 + [4] * 2 + [0]))  # 0: a scalar
    row = tuple(draw(st.sampled_from([1, 2, 3] * 5 + [0])) for _ in range(max(rank - 1, 0)))
    shape_true = (n, *row) if rank else ()
    shape_pred = shape_true
    if draw(st.integers(0, 29)) == 0:  # mismatched shapes
        shape_pred = (n + 1, *row) if rank else (1,)

    ids_dtype = draw(st.sampled_from([np.int32, np.int64]))
    g = draw(st.sampled_from([1, 1, 2, 3, 7, 20, 100_000]))
    id_range = draw(st.sampled_from(["valid"] * 8 + ["over", "extreme"]))
    ids_len = n if draw(st.integers(0, 29)) else n + draw(st.sampled_from([-1, 1, 2]))
    ids_len = max(ids_len, 0)
    ids = rng.integers(-3, g, ids_len)
    if id_range == "over" and ids_len:
        ids[rng.integers(0, ids_len)] = g + rng.integers(0, 3)
    if id_range == "extreme" and ids_len:
        big = 2**40 if ids_dtype == np.int64 else INT32_MAX
        ids[rng.integers(0, ids_len)] = rng.choice([big, -big - 1])
    ids = ids.astype(ids_dtype)

    num_groups_kind = draw(
        st.sampled_from(["int"] * 4 + ["int32", "int64", "none", "none", "one", "bad", "huge"])
    )
    num_groups = {
        "int": g,
        "int32": np.int32(g),
        "int64": np.int64(g),
        "none": None,
        "one": 1,
        "bad": draw(st.sampled_from([0, -1, -(2**40)])),
        "huge": draw(st.sampled_from([2**31, 2**40, 2**63 - 1])),
    }[num_groups_kind]

    def weights(length):
        kind = draw(st.sampled_from(["none"] * 5 + ["ok"] * 6 + ["negative", "nan", "length"]))
        if kind == "none":
            return None
        w = rng.uniform(0, 3, length) * (rng.random(length) > 0.2)
        if kind in ("negative", "nan") and length:
            w[rng.integers(0, length)] = -0.5 if kind == "negative" else np.nan
        if kind == "length":
            w = np.ones(length + 1 if length == 0 else length + draw(st.sampled_from([-1, 1])))
        return w

    y_true = rng.integers(-400, 401, shape_true) / 4
    y_pred = rng.integers(-400, 401, shape_pred) / 4
    effective_g = g if num_groups_kind in ("int", "int32", "int64") else 1
    if num_groups_kind == "none":
        effective_g = max(int(ids.max(initial=-1)) + 1, 1) if ids.size else 1
    return dict(
        y_true=tf.cast(y_true, true_dtype),
        y_pred=tf.cast(y_pred, pred_dtype),
        group_ids=ids,
        num_groups=num_groups,
        sample_weight=weights(n),
        group_weights=weights(min(effective_g, 200_000)),
        with_gradient=draw(st.booleans()),
    )


def problems(inp) -> tuple[set, int | None]:
    """Which arguments are bad according to the spec (not the implementation), and G."""
    yt, yp, ids = inp["y_true"], inp["y_pred"], inp["group_ids"]
    bad = set()
    for t, name in ((yt, "y_true"), (yp, "y_pred")):
        if t.dtype not in FLOAT_DTYPES:
            bad.add(name)
    if bad:
        return bad, None
    if yt.dtype != yp.dtype:
        bad.add("y_true")
    if yt.shape != yp.shape or yt.shape.rank == 0:
        bad |= {"y_true", "y_pred"}
    elif yt.shape[1:].num_elements() == 0:
        bad.add("y_true")  # rows without elements
    n = yt.shape[0] if yt.shape.rank else None
    if ids.ndim != 1 or (n is not None and len(ids) != n):
        bad.add("group_ids")
    g = inp["num_groups"]
    if g is None:
        g = max(int(ids.max(initial=-1)) + 1, 1)
    g = int(g)
    if g <= 0 or g > INT32_MAX:
        bad.add("num_groups")
        g = None
    elif (ids >= g).any():
        bad.add("group_ids")
    sw = inp["sample_weight"]
    if sw is not None:
        if n is None or len(sw) != n:
            bad.add("sample_weight")
        elif len(ids) == n and not (sw[ids >= 0] >= 0).all():
            # Padding rows (id < 0) are ignored entirely, their weights included.
            bad.add("sample_weight")
    gw = inp["group_weights"]
    if gw is not None and g is not None and (len(gw) != g or not (gw >= 0).all()):
        bad.add("group_weights")
    return bad, g


def loss_and_grad(fn, y_true, y_pred, ids, num_groups, sample_weight, group_weights, grad):
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fn(
            y_true,
            y_pred,
            ids,
            num_groups,
            sample_weight=sample_weight,
            group_weights=group_weights,
        )
    return loss, (tape.gradient(loss, y_pred) if grad else None)


_FUNCTIONS: dict = {}
ARGS = ("y_true", "y_pred", "group_ids", "num_groups", "sample_weight", "group_weights")


def in_function(inp):
    """loss_and_grad inside a tf.function with unknown input shapes (one trace per dtypes)."""
    present = [k for k in ARGS if inp[k] is not None]
    values = []
    for k in present:
        v = inp[k]
        if k == "num_groups":
            v = tf.constant(v, tf.int32 if -(2**31) <= v <= INT32_MAX else tf.int64)
        elif k in ("sample_weight", "group_weights"):
            v = tf.constant(v, inp["y_pred"].dtype)
        values.append(tf.convert_to_tensor(v))
    key = (tuple(present), tuple(v.dtype for v in values), inp["with_gradient"])
    if key not in _FUNCTIONS:

        def f(*args):
            a = dict.fromkeys(ARGS)
            a.update(zip(present, args, strict=True))
            return loss_and_grad(gm.grouped_mae, *(a[k] for k in ARGS), inp["with_gradient"])

        _FUNCTIONS[key] = tf.function(
            f, input_signature=[tf.TensorSpec(None, v.dtype) for v in values]
        )
    return _FUNCTIONS[key](*values)


def check(inp, run):
    bad, g = problems(inp)
    try:
        loss, grad = run(inp)
    except CLEAR_ERRORS as err:
        message = err.message if isinstance(err, tf.errors.OpError) else str(err)
        assert bad, f"valid input rejected: {message}"
        assert any(name in message for name in bad), f"{message!r} names none of {bad}"
        return "error"
    assert not bad, f"bad {bad} accepted, loss {loss}"

    dtype = inp["y_pred"].dtype
    weights = {
        k: None if inp[k] is None else tf.cast(tf.constant(inp[k]), dtype)
        for k in ("sample_weight", "group_weights")
    }
    args = (inp["y_true"], inp["y_pred"], inp["group_ids"], g)
    expected = formula_loss(*args, *weights.values())
    assert loss.dtype == dtype and loss.shape == ()
    rtol, atol = LOSS_RTOL["formula"][dtype], ATOL[dtype]
    np.testing.assert_allclose(as_float64(loss), expected, rtol=rtol, atol=atol)
    ref = reference.grouped_mae(*args, **weights)
    np.testing.assert_allclose(
        as_float64(loss), as_float64(ref), rtol=LOSS_RTOL["reference"][dtype], atol=atol
    )
    if grad is not None:
        expected_grad = formula_grad(*args, *weights.values())
        np.testing.assert_allclose(
            as_float64(grad), expected_grad, rtol=GRAD_RTOL[dtype], atol=atol
        )
    return "value"


def eager(inp):
    return loss_and_grad(gm.grouped_mae, *(inp[k] for k in ARGS), inp["with_gradient"])


@settings(max_examples=12 * PER_EXAMPLE)
@given(fuzz_inputs())
def test_fuzz_eager(inp):
    event(check(inp, eager))


@settings(max_examples=8 * PER_EXAMPLE)
@given(fuzz_inputs())
def test_fuzz_tf_function(inp):
    event(check(inp, in_function))
