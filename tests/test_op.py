"""The fused op against hand-computed cases, the float64 formula and the pure-TF reference:
values, per-group statistics and gradients, in eager mode, tf.function and XLA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from cases import (
    CASES,
    FLOAT_DTYPES,
    GRAD_RTOL,
    LOSS_RTOL,
    STATS_RTOL,
    as_float64,
    formula_grad,
    formula_loss,
    formula_stats,
)
from hypothesis import given
from hypothesis import strategies as st

import grouped_mae_op as gm
from grouped_mae_op import reference

# float16's subnormals (below 6.1e-5) are spaced 2^-24 apart: a loss or gradient entry that
# small carries an absolute, not a relative, rounding error.
ATOL = {tf.float16: 6e-8, tf.bfloat16: 0.0, tf.float32: 0.0, tf.float64: 0.0}
MODES = ("eager", "function", "xla")


def run(fn, mode: str, *args, **kwargs):
    """Calls fn eagerly, inside tf.function, or inside tf.function(jit_compile=True).

    Tensor arguments are passed as function arguments (not captured), so inside a
    tf.function the kernel sees run-time values and does its own validation.
    """
    if mode == "eager":
        return fn(*args, **kwargs)
    wrapped = tf.function(lambda *a, **k: fn(*a, **k), jit_compile=mode == "xla")
    return wrapped(*args, **kwargs)


def case_inputs(case: dict, dtype: tf.DType):
    ids_dtype = tf.int64 if case.get("ids_dtype") == "int64" else tf.int32
    y_true = tf.constant(case["y_true"], dtype)
    y_pred = tf.constant(case["y_pred"], dtype)
    ids = tf.constant(case["group_ids"], ids_dtype)
    kwargs = {}
    for key in ("sample_weight", "group_weights"):
        if key in case:
            kwargs[key] = tf.constant(case[key], dtype)
    return y_true, y_pred, ids, kwargs


def case_params():
    for name, case in CASES.items():
        for mode in MODES:
            # Under XLA num_groups must be a compile-time constant (not inferred from ids).
            if mode == "xla" and case.get("num_groups") is None:
                continue
            yield pytest.param(name, mode, id=f"{name}-{mode}")


# ---------------------------------------------------------------------------------------
# Hand-computed cases.


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("name, mode", list(case_params()))
def test_case_loss(name, mode, dtype):
    case = CASES[name]
    y_true, y_pred, ids, kwargs = case_inputs(case, dtype)
    loss = run(gm.grouped_mae, mode, y_true, y_pred, ids, case.get("num_groups"), **kwargs)
    assert loss.dtype == dtype
    assert loss.shape == ()
    got = float(loss)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, case["loss"], rtol=LOSS_RTOL["formula"][dtype])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "sums" in c])
def test_case_stats(name):
    case = CASES[name]
    for dtype in FLOAT_DTYPES:
        y_true, y_pred, ids, kwargs = case_inputs(case, dtype)
        kwargs.pop("group_weights", None)
        sums, weights = gm.grouped_mae_stats(y_true, y_pred, ids, case.get("num_groups"), **kwargs)
        assert sums.dtype == (tf.float64 if dtype == tf.float64 else tf.float32)
        np.testing.assert_allclose(sums.numpy(), case["sums"], rtol=STATS_RTOL[dtype])
        np.testing.assert_allclose(weights.numpy(), case["weights"], rtol=STATS_RTOL[dtype])


@pytest.mark.parametrize("name", list(CASES))
def test_formula_agrees_with_hand_computed_cases(name):
    # The float64 formula is itself the oracle of the property tests: check it on the cases.
    case = CASES[name]
    ids = np.asarray(case["group_ids"], np.int64)
    g = case.get("num_groups") or max(int(ids.max(initial=-1)) + 1, 1)
    got = formula_loss(
        case["y_true"],
        case["y_pred"],
        ids,
        g,
        case.get("sample_weight"),
        case.get("group_weights"),
    )
    assert got == pytest.approx(case["loss"], rel=1e-15)


def test_empty_input_gradient_is_empty_and_finite():
    y_pred = tf.zeros([0, 3], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = gm.grouped_mae(tf.zeros([0, 3]), y_pred, tf.zeros([0], tf.int32), 5)
    grad = tape.gradient(loss, y_pred)
    assert float(loss) == 0.0
    assert grad.shape == (0, 3)


# ---------------------------------------------------------------------------------------
# Random cases (hypothesis) against the float64 formula and the pure-TF reference.


@st.composite
def problems(draw, max_n=300, with_group_weights=True):
    """A random valid problem: inputs as numpy arrays / tensors plus how to pass them."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    n = draw(st.integers(0, max_n))
    g = draw(st.integers(1, 20))
    row_shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    ids_dtype = draw(st.sampled_from([np.int32, np.int64]))
    num_groups_kind = draw(st.sampled_from(["int", "int32", "int64", "none"]))
    has_sw = draw(st.booleans())
    has_gw = with_group_weights and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    # Values on a coarse grid in [-64, 64] hit exact ties (sign(0) = 0) now and then.
    scale = draw(st.sampled_from([1.0, 0.25, 1e-2]))
    y_true = rng.integers(-256, 257, (n, *row_shape)) * scale / 4
    y_pred = rng.integers(-256, 257, (n, *row_shape)) * scale / 4
    # Ids in [-2, g): some rows ignored, some groups empty, unsorted.
    ids = rng.integers(-2, g, n).astype(ids_dtype)
    sw = rng.uniform(0, 3, n) * (rng.random(n) > 0.2) if has_sw else None
    gw = rng.uniform(0, 2, g) * (rng.random(g) > 0.2) if has_gw else None

    if num_groups_kind == "none":
        g = max(int(ids.max(initial=-1)) + 1, 1)
        num_groups = None
    elif num_groups_kind == "int":
        num_groups = g
    else:
        num_groups = tf.constant(g, getattr(tf, num_groups_kind))
    if gw is not None:
        gw = gw[:g] if len(gw) >= g else np.concatenate([gw, np.ones(g - len(gw))])

    def t(x):
        return None if x is None else tf.constant(x, dtype)

    return dict(
        dtype=dtype,
        y_true=t(y_true),
        y_pred=t(y_pred),
        group_ids=ids,
        num_groups=num_groups,
        g=g,
        sample_weight=t(sw),
        group_weights=t(gw),
    )


def call_kwargs(p, with_group_weights=True):
    kw = {"sample_weight": p["sample_weight"]}
    if with_group_weights:
        kw["group_weights"] = p["group_weights"]
    return kw


@given(problems())
def test_loss_matches_formula_and_reference(p):
    dtype = p["dtype"]
    args = (p["y_true"], p["y_pred"], p["group_ids"], p["num_groups"])
    got = gm.grouped_mae(*args, **call_kwargs(p))
    assert got.dtype == dtype
    expected = formula_loss(
        p["y_true"], p["y_pred"], p["group_ids"], p["g"], p["sample_weight"], p["group_weights"]
    )
    atol = ATOL[dtype]
    np.testing.assert_allclose(
        as_float64(got), expected, rtol=LOSS_RTOL["formula"][dtype], atol=atol
    )
    ref = reference.grouped_mae(*args, **call_kwargs(p))
    np.testing.assert_allclose(
        as_float64(got), as_float64(ref), rtol=LOSS_RTOL["reference"][dtype], atol=atol
    )


@given(problems(with_group_weights=False))
def test_stats_match_formula_and_reference(p):
    dtype = p["dtype"]
    args = (p["y_true"], p["y_pred"], p["group_ids"], p["num_groups"])
    sums, weights = gm.grouped_mae_stats(*args, sample_weight=p["sample_weight"])
    assert sums.shape == (p["g"],) and weights.shape == (p["g"],)
    exp_s, exp_w = formula_stats(
        p["y_true"], p["y_pred"], p["group_ids"], p["g"], p["sample_weight"]
    )
    rtol = STATS_RTOL[dtype]
    np.testing.assert_allclose(sums.numpy(), exp_s, rtol=rtol)
    np.testing.assert_allclose(weights.numpy(), exp_w, rtol=rtol)
    ref_s, ref_w = reference.grouped_mae_stats(*args, sample_weight=p["sample_weight"])
    np.testing.assert_allclose(sums.numpy(), ref_s.numpy(), rtol=2 * rtol)
    np.testing.assert_allclose(weights.numpy(), ref_w.numpy(), rtol=2 * rtol)


def tape_grads(fn, p, **kwargs):
    y_true, y_pred = p["y_true"], p["y_pred"]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = fn(y_true, y_pred, p["group_ids"], p["num_groups"], **kwargs)
    return tape.gradient(loss, y_true), tape.gradient(loss, y_pred)


@given(problems(max_n=120))
def test_gradient_matches_formula_and_reference(p):
    dtype = p["dtype"]
    g_true, g_pred = tape_grads(gm.grouped_mae, p, **call_kwargs(p))
    assert g_pred.dtype == dtype and g_pred.shape == p["y_pred"].shape
    # The y_true gradient is exactly the negated y_pred gradient.
    np.testing.assert_array_equal(g_true.numpy(), -g_pred.numpy())
    expected = formula_grad(
        p["y_true"], p["y_pred"], p["group_ids"], p["g"], p["sample_weight"], p["group_weights"]
    )
    rtol, atol = GRAD_RTOL[dtype], ATOL[dtype]
    np.testing.assert_allclose(as_float64(g_pred), expected, rtol=rtol, atol=atol)
    _, ref_pred = tape_grads(reference.grouped_mae, p, **call_kwargs(p))
    np.testing.assert_allclose(as_float64(g_pred), as_float64(ref_pred), rtol=rtol, atol=atol)


@given(problems(max_n=120, with_group_weights=False), st.integers(0, 2**32 - 1))
def test_stats_gradient_matches_reference(p, seed):
    # A random linear functional of the sums: d/dy_pred sum_g c_g S_g = c_g w_i sign / D.
    c = np.random.default_rng(seed).normal(size=p["g"])

    def functional(fn):
        def f(y_true, y_pred, ids, num_groups, **kw):
            sums, _ = fn(y_true, y_pred, ids, num_groups, **kw)
            return tf.reduce_sum(tf.constant(c, sums.dtype) * sums)

        return f

    kw = {"sample_weight": p["sample_weight"]}
    g_true, g_pred = tape_grads(functional(gm.grouped_mae_stats), p, **kw)
    np.testing.assert_array_equal(g_true.numpy(), -g_pred.numpy())
    _, ref_pred = tape_grads(functional(reference.grouped_mae_stats), p, **kw)
    dtype = p["dtype"]
    np.testing.assert_allclose(
        as_float64(g_pred), as_float64(ref_pred), rtol=GRAD_RTOL[dtype], atol=ATOL[dtype]
    )


# ---------------------------------------------------------------------------------------
# Numerical gradients (float64), away from the kink of |x| at 0.


def away_from_kinks(rng, shape):
    y_true = rng.normal(size=shape)
    gap = rng.uniform(0.2, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return y_true, y_true + gap


@pytest.mark.parametrize("row_shape", [(), (3,), (2, 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_compute_gradient_loss(row_shape, weighted):
    rng = np.random.default_rng(7)
    n, g = 12, 4
    y_true, y_pred = away_from_kinks(rng, (n, *row_shape))
    ids = np.array([0, 1, 2, 3, 0, 1, -1, 3, 0, 0, 1, 3], np.int32)
    kw = {}
    if weighted:
        kw = dict(sample_weight=rng.uniform(0.1, 2, n), group_weights=rng.uniform(0.1, 2, g))
    for which in ("y_pred", "y_true"):

        def f(x, which=which):
            args = (y_true, x) if which == "y_pred" else (x, y_pred)
            return gm.grouped_mae(*args, ids, g, **kw)

        x0 = y_pred if which == "y_pred" else y_true
        theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(x0)])
        assert np.abs(theoretical[0]).max() > 0
        np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
def test_compute_gradient_stats(weighted):
    rng = np.random.default_rng(11)
    n, g = 10, 3
    y_true, y_pred = away_from_kinks(rng, (n, 2))
    ids = np.array([2, 0, 0, 1, -1, 2, 2, 1, 0, 0], np.int64)
    c = tf.constant(rng.normal(size=g))
    sw = rng.uniform(0.1, 2, n) if weighted else None

    def f(x):
        sums, weights = gm.grouped_mae_stats(y_true, x, ids, g, sample_weight=sw)
        # W carries no gradient; adding it checks that the op tolerates a grad for it.
        return tf.reduce_sum(c * sums) + tf.reduce_sum(weights)

    theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(y_pred)])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-8)


def test_ids_and_weights_get_no_gradient():
    y_true = tf.constant([0.0, 1.0, 2.0])
    y_pred = tf.constant([1.0, 3.0, 0.0])
    sw = tf.constant([1.0, 2.0, 0.5])
    gw = tf.constant([1.0, 3.0])
    ids = tf.constant([0, 1, 1])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([sw, gw, y_pred])
        loss = gm.grouped_mae(y_true, y_pred, ids, 2, sample_weight=sw, group_weights=gw)
        sums, _ = gm.grouped_mae_stats(y_true, y_pred, ids, 2, sample_weight=sw)
    assert tape.gradient(loss, sw) is None
    assert tape.gradient(loss, gw) is None
    assert tape.gradient(sums, sw) is None
    assert tape.gradient(loss, y_pred) is not None


def test_sign_of_zero_error_is_zero():
    # Rows with pred == true get a zero gradient (tf.abs's convention), the others do not.
    y_true = tf.constant([1.0, 2.0, 3.0])
    y_pred = tf.constant([1.0, 4.0, 3.0])
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = gm.grouped_mae(y_true, y_pred, [0, 0, 0], 1)
    np.testing.assert_array_equal(tape.gradient(loss, y_pred).numpy(), np.float32([0, 1 / 3, 0]))


# ---------------------------------------------------------------------------------------
# Modes: eager, tf.function, XLA, for value and gradient.


def mode_problem(dtype):
    rng = np.random.default_rng(3)
    n, g = 64, 6
    y_true, y_pred = away_from_kinks(rng, (n, 3))
    ids = rng.integers(-1, g, n).astype(np.int32)
    sw = rng.uniform(0, 2, n)
    gw = rng.uniform(0, 2, g)
    return [tf.constant(x, dtype) for x in (y_true, y_pred)] + [
        tf.constant(ids),
        g,
        tf.constant(sw, dtype),
        tf.constant(gw, dtype),
    ]


def loss_and_grad(y_true, y_pred, ids, g, sw, gw):
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = gm.grouped_mae(y_true, y_pred, ids, g, sample_weight=sw, group_weights=gw)
    return loss, tape.gradient(loss, y_pred)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_modes_value_and_gradient(mode, dtype):
    y_true, y_pred, ids, g, sw, gw = mode_problem(dtype)
    loss, grad = run(loss_and_grad, mode, y_true, y_pred, ids, g, sw, gw)
    expected = formula_loss(y_true, y_pred, ids.numpy(), g, sw, gw)
    np.testing.assert_allclose(as_float64(loss), expected, rtol=LOSS_RTOL["formula"][dtype])
    exp_grad = formula_grad(y_true, y_pred, ids.numpy(), g, sw, gw)
    np.testing.assert_allclose(as_float64(grad), exp_grad, rtol=GRAD_RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_modes_stats(mode):
    y_true, y_pred, ids, g, sw, _ = mode_problem(tf.float32)
    sums, weights = run(
        lambda *a: gm.grouped_mae_stats(*a, sample_weight=sw), mode, y_true, y_pred, ids, g
    )
    exp_s, exp_w = formula_stats(y_true, y_pred, ids.numpy(), g, sw)
    np.testing.assert_allclose(sums.numpy(), exp_s, rtol=1e-6)
    np.testing.assert_allclose(weights.numpy(), exp_w, rtol=1e-6)


def test_static_output_shape_when_num_groups_is_constant():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([None])])
    def f(y_true, y_pred):
        ids = tf.zeros_like(y_true, tf.int32)
        sums, weights = gm.grouped_mae_stats(y_true, y_pred, ids, 7)
        assert sums.shape == (7,) and weights.shape == (7,)
        return sums

    assert f(tf.ones([3]), tf.zeros([3])).shape == (7,)


@pytest.mark.parametrize("ids_dtype", [tf.int32, tf.int64])
def test_xla_out_of_range_id_gives_nan_not_a_number(ids_dtype):
    # XLA cannot raise on data: an id >= num_groups makes the loss NaN, and the gradient
    # of that row NaN, never a plausible number.
    @tf.function(jit_compile=True)
    def f(y_true, y_pred, ids):
        return loss_and_grad(y_true, y_pred, ids, 3, None, None)

    loss, grad = f(tf.zeros([4]), tf.ones([4]), tf.constant([0, 1, 3, 2], ids_dtype))
    assert np.isnan(float(loss))
    assert np.isnan(grad.numpy()[2])
    sums, _ = tf.function(
        lambda ids: gm.grouped_mae_stats(tf.zeros([2]), tf.ones([2]), ids, 2), jit_compile=True
    )(tf.constant([0, 5], ids_dtype))
    assert np.isnan(sums.numpy()).all()


def test_xla_negative_weight_gives_nan():
    f = tf.function(
        lambda sw, gw: gm.grouped_mae(
            tf.zeros([2]), tf.ones([2]), [0, 1], 2, sample_weight=sw, group_weights=gw
        ),
        jit_compile=True,
    )
    assert np.isnan(float(f(tf.constant([1.0, -1.0]), tf.constant([1.0, 1.0]))))
    assert np.isnan(float(f(tf.constant([1.0, 1.0]), tf.constant([1.0, float("nan")]))))
    assert float(f(tf.constant([1.0, 1.0]), tf.constant([1.0, 1.0]))) == 1.0


# ---------------------------------------------------------------------------------------
# CPU determinism.


def test_cpu_results_are_bitwise_identical_across_runs():
    # 2^18 rows: enough for several forward shards (one per 2^15 rows, capped by TF's
    # intra-op thread count), so the fixed-order merge of per-shard partials is exercised.
    rng = np.random.default_rng(5)
    n, g = 1 << 18, 1000
    y_true = tf.constant(rng.normal(size=(n, 2)).astype(np.float32))
    y_pred = tf.constant(rng.normal(size=(n, 2)).astype(np.float32))
    ids = tf.constant(rng.integers(-1, g, n).astype(np.int32))
    sw = tf.constant(rng.uniform(0, 1, n).astype(np.float32))
    with tf.device("/CPU:0"):
        first = None
        for _ in range(20):
            loss, grad = loss_and_grad(y_true, y_pred, ids, g, sw, None)
            sums, weights = gm.grouped_mae_stats(y_true, y_pred, ids, g, sample_weight=sw)
            now = [x.numpy() for x in (loss, grad, sums, weights)]
            if first is None:
                first = now
            for a, b in zip(first, now, strict=True):
                assert a.tobytes() == b.tobytes()
    ref = reference.grouped_mae(y_true, y_pred, ids, g, sample_weight=sw)
    np.testing.assert_allclose(first[0], ref.numpy(), rtol=2e-6)


# ---------------------------------------------------------------------------------------
# Non-finite values reach the loss and only their own group's gradient.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "bad_pred, bad_true, expected_loss",
    [
        (np.nan, 0.0, np.nan),
        (np.inf, 0.0, np.inf),
        (-np.inf, 0.0, np.inf),
        (np.inf, np.inf, np.nan),
    ],
)
def test_non_finite_value_reaches_loss_and_only_its_own_group(
    mode, bad_pred, bad_true, expected_loss
):
    rng = np.random.default_rng(9)
    n, g = 12, 3
    y_true, y_pred = away_from_kinks(rng, (n, 2))
    ids = np.array([0, 1, 2] * 4, np.int32)
    y_pred[4, 1], y_true[4, 1] = bad_pred, bad_true  # row 4 is in group 1
    y_true, y_pred = tf.constant(y_true), tf.constant(y_pred)
    loss, grad = run(loss_and_grad, mode, y_true, y_pred, tf.constant(ids), g, None, None)
    np.testing.assert_equal(float(loss), expected_loss)
    expected = formula_grad(y_true, y_pred, ids, g)
    grad = grad.numpy()
    other = ids != 1
    assert np.isfinite(grad[other]).all()
    np.testing.assert_allclose(grad[other], expected[other], rtol=1e-12)
    # Within group 1 the gradient is what the formula gives (sign(NaN) = NaN for the NaN
    # element itself, finite elsewhere): nothing is hidden, nothing spreads.
    np.testing.assert_allclose(grad[~other], expected[~other], rtol=1e-12)
    sums, _ = run(lambda *a: gm.grouped_mae_stats(*a), mode, y_true, y_pred, tf.constant(ids), g)
    assert np.isfinite(sums.numpy()[[0, 2]]).all()
    np.testing.assert_equal(sums.numpy()[1], expected_loss)


# ---------------------------------------------------------------------------------------
# Concurrency: several Python threads calling the op at once.


def test_concurrent_calls_from_python_threads_give_correct_results():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(21)
    problems_ = []
    for k, n in enumerate([0, 7, 1000, 1 << 17, 50_000, 3, 1 << 16, 999]):
        dtype = FLOAT_DTYPES[k % 4]
        y_true, y_pred = (tf.constant(rng.normal(size=(n, 2)), dtype) for _ in range(2))
        ids = tf.constant(rng.integers(-1, 50, n), tf.int64)
        sw = tf.constant(rng.uniform(0, 2, n), dtype)
        problems_.append((y_true, y_pred, ids, 50, sw, None))
    # Single-threaded answers first (the op is deterministic: threads must not change them).
    expected = [[x.numpy() for x in loss_and_grad(*p)] for p in problems_]
    for p, (loss, _) in zip(problems_, expected, strict=True):
        np.testing.assert_allclose(
            float(loss),
            formula_loss(p[0], p[1], p[2].numpy(), 50, p[4]),
            rtol=LOSS_RTOL["formula"][p[0].dtype],
        )

    def work(k):
        for _ in range(10):
            got = [x.numpy() for x in loss_and_grad(*problems_[k])]
            for a, b in zip(expected[k], got, strict=True):
                if a.tobytes() != b.tobytes():
                    return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, list(range(len(problems_))) * 2))
    assert all(results)


# ---------------------------------------------------------------------------------------
# GPU (skipped when no GPU is visible).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_gpu_matches_formula(dtype):
    y_true, y_pred, ids, g, sw, gw = mode_problem(dtype)
    with tf.device("/GPU:0"):
        loss, grad = loss_and_grad(y_true, y_pred, ids, g, sw, gw)
        sums, weights = gm.grouped_mae_stats(y_true, y_pred, ids, g, sample_weight=sw)
    assert "GPU" in loss.device
    np.testing.assert_allclose(
        as_float64(loss),
        formula_loss(y_true, y_pred, ids.numpy(), g, sw, gw),
        rtol=LOSS_RTOL["formula"][dtype],
    )
    np.testing.assert_allclose(
        as_float64(grad),
        formula_grad(y_true, y_pred, ids.numpy(), g, sw, gw),
        rtol=GRAD_RTOL[dtype],
        atol=ATOL[dtype],
    )
    exp_s, exp_w = formula_stats(y_true, y_pred, ids.numpy(), g, sw)
    np.testing.assert_allclose(sums.numpy(), exp_s, rtol=STATS_RTOL[dtype])
    np.testing.assert_allclose(weights.numpy(), exp_w, rtol=STATS_RTOL[dtype])


@pytest.mark.gpu
def test_gpu_out_of_range_id_gives_nan():
    with tf.device("/GPU:0"):
        loss = gm.grouped_mae(tf.zeros([3]), tf.ones([3]), tf.constant([0, 7, 1]), 2)
    assert np.isnan(float(loss))


def test_saved_model_loads_in_a_fresh_process_after_the_import(tmp_path):
    # Save a tf.Module that calls the op and its gradient; load it in new processes: without
    # `import grouped_mae_op` TF names the missing op, with it the values are those saved.
    class Step(tf.Module):
        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.float32)] * 2
            + [tf.TensorSpec([None], tf.int32)]
        )
        def __call__(self, y_true, y_pred, ids):
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                loss = gm.grouped_mae(y_true, y_pred, ids, 3)
            return loss, tape.gradient(loss, y_pred)

    tf.saved_model.save(Step(), str(tmp_path / "sm"))
    y_true, y_pred, ids = [0.0, 0.0, 0.0, 1.0], [1.0, 3.0, -2.0, 1.0], [0, 0, 2, -1]
    want = formula_loss(y_true, y_pred, ids, 3)  # groups 0 and 2: (2 + 2) / 2
    load = (
        "import json, sys, tensorflow as tf\n"
        "{imp}"
        "m = tf.saved_model.load(sys.argv[1])\n"
        f"loss, grad = m(tf.constant({y_true}), tf.constant({y_pred}), tf.constant({ids}))\n"
        "print(json.dumps([float(loss), grad.numpy().tolist()]))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    without = subprocess.run(
        [sys.executable, "-c", load.format(imp=""), str(tmp_path / "sm")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert without.returncode != 0
    assert "GroupedMae" in without.stderr
    with_import = subprocess.run(
        [sys.executable, "-c", load.format(imp="import grouped_mae_op\n"), str(tmp_path / "sm")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert with_import.returncode == 0, with_import.stderr[-2000:]
    loss, grad = json.loads(with_import.stdout.strip().splitlines()[-1])
    assert loss == pytest.approx(want, rel=1e-6)
    # d/dy_pred: sign / (count_g * present groups) = +-1 / (2 * 2), group 2: -1 / (1 * 2).
    np.testing.assert_allclose(grad, [0.25, 0.25, -0.5, 0.0], rtol=1e-6)
