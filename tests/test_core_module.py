"""CPU path of the TF-free core module (grouped_mae_op._core) against the float64 numpy
formula: stats, loss, gradient scales, backward, bad input, and thread-count independence of
the result on one machine."""

import sys
from pathlib import Path

import numpy as np
import pytest

from grouped_mae_op import _core

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from np_reference import grad_np, grouped_mae_np  # noqa: E402

# The core takes |pred - true| in the input type and accumulates in float64, so float32 inputs
# differ from the all-float64 formula by the rounding of each difference (<= 2^-24 relative).
RTOL = {np.float32: 1e-7, np.float64: 1e-12}


def make_inputs(rng, n, d, g, dtype, id_dtype, weighted, layout="random"):
    shape = (n,) if d == 1 else (n, d)
    y_true = rng.normal(size=shape).astype(dtype)
    y_pred = rng.normal(size=shape).astype(dtype)
    if layout == "sorted":
        ids = np.sort(rng.integers(-1, g, size=n))
    else:
        ids = rng.integers(-1, g, size=n)  # -1: ignored rows
    ids = ids.astype(id_dtype)
    sw = rng.uniform(0, 2, size=n).astype(dtype) if weighted else None
    return y_true, y_pred, ids, sw


CASES = [
    # n, d, g, dtype, id dtype, weighted, layout
    (1000, 1, 1, np.float32, np.int32, False, "random"),
    (100_000, 1, 37, np.float32, np.int64, True, "random"),
    (100_000, 1, 5000, np.float64, np.int32, False, "sorted"),
    (3000, 4, 13, np.float64, np.int64, True, "random"),
    (70_000, 3, 200, np.float32, np.int32, True, "sorted"),
]


@pytest.mark.parametrize("n,d,g,dtype,id_dtype,weighted,layout", CASES)
@pytest.mark.parametrize("threads", [1, 3])
def test_stats_and_loss_match_numpy(n, d, g, dtype, id_dtype, weighted, layout, threads):
    rng = np.random.default_rng(n + g + d)
    y_true, y_pred, ids, sw = make_inputs(rng, n, d, g, dtype, id_dtype, weighted, layout)
    gw = rng.uniform(0, 3, size=g).astype(dtype)
    s_ref, w_ref, _, _ = grouped_mae_np(y_true, y_pred, ids, g, sw)
    _, _, loss_ref, scale_ref = grouped_mae_np(y_true, y_pred, ids, g, sw, gw)

    sums, weights = _core.cpu_stats(y_true, y_pred, ids, g, sample_weight=sw, threads=threads)
    np.testing.assert_allclose(sums, s_ref, rtol=RTOL[dtype], atol=0)
    np.testing.assert_allclose(weights, w_ref, rtol=1e-12, atol=0)

    loss, scale = _core.cpu_loss(
        y_true, y_pred, ids, g, sample_weight=sw, group_weights=gw, threads=threads
    )
    assert scale.dtype == dtype
    np.testing.assert_allclose(loss, loss_ref, rtol=RTOL[dtype])
    np.testing.assert_allclose(scale, scale_ref, rtol=max(RTOL[dtype], 1e-7), atol=0)


@pytest.mark.parametrize("n,d,g,dtype,id_dtype,weighted,layout", CASES[1:4])
def test_backward_matches_numpy(n, d, g, dtype, id_dtype, weighted, layout):
    rng = np.random.default_rng(7 * n + g)
    y_true, y_pred, ids, sw = make_inputs(rng, n, d, g, dtype, id_dtype, weighted, layout)
    _, scale = _core.cpu_loss(y_true, y_pred, ids, g, sample_weight=sw)
    grad = _core.cpu_backward(y_true, y_pred, ids, scale, 0.75, sample_weight=sw)
    assert grad.dtype == dtype and grad.shape == y_pred.shape
    expect = grad_np(y_true, y_pred, ids, scale, 0.75, sw)
    np.testing.assert_allclose(grad, expect, rtol=4 * RTOL[dtype], atol=0)
    assert np.all(grad[ids < 0] == 0)


def test_empty_groups_and_all_ignored():
    y_true = np.array([0.0, 1.0, 3.0, 5.0])
    y_pred = np.array([1.0, 1.0, 0.0, 0.0])
    ids = np.array([0, 3, 3, -2], np.int32)  # groups 1, 2 and 4 are empty
    loss, scale = _core.cpu_loss(y_true, y_pred, ids, 5)
    assert loss == pytest.approx((1.0 + 1.5) / 2)  # group 0: 1, group 3: (0 + 3) / 2
    np.testing.assert_array_equal(scale, [0.5, 0, 0, 0.25, 0])
    loss, scale = _core.cpu_loss(y_true, y_pred, np.full(4, -1, np.int64), 2)
    assert loss == 0.0
    np.testing.assert_array_equal(scale, [0.0, 0.0])


def test_result_is_independent_of_repeats():
    rng = np.random.default_rng(3)
    y_true, y_pred, ids, sw = make_inputs(rng, 200_000, 1, 100, np.float32, np.int32, True)
    first = _core.cpu_loss(y_true, y_pred, ids, 100, sample_weight=sw, threads=2)
    for _ in range(3):
        again = _core.cpu_loss(y_true, y_pred, ids, 100, sample_weight=sw, threads=2)
        assert again[0] == first[0]
        np.testing.assert_array_equal(again[1], first[1])


@pytest.mark.parametrize("g", [20_000, 50_000, 150_000])
@pytest.mark.parametrize("weighted", [False, True])
def test_finalize_over_many_groups_is_independent_of_the_thread_count(g, weighted):
    # Under 2 * 32768 rows the forward runs one shard whatever the threads, so only the passes
    # over the groups (the loss's sums, the scales, the statistics' unpacking) may use them.
    # Past 16384 groups those run on several threads; the loss is summed over fixed chunks of
    # groups, so its bits must not depend on the thread count.
    rng = np.random.default_rng(g)
    n = 60_000
    y_true = rng.normal(size=n).astype(np.float64)
    y_pred = rng.normal(size=n).astype(np.float64)
    ids = rng.integers(0, g, size=n).astype(np.int32)
    sw = rng.uniform(0, 2, size=n) if weighted else None
    gw = rng.uniform(0, 3, size=g) if weighted else None
    runs = {
        t: (
            _core.cpu_loss(y_true, y_pred, ids, g, sample_weight=sw, group_weights=gw, threads=t),
            _core.cpu_stats(y_true, y_pred, ids, g, sample_weight=sw, threads=t),
        )
        for t in (1, 2, 3, 8)
    }
    (loss, scale), (sums, weights) = runs[1]
    want_s, want_w, want_loss, want_scale = grouped_mae_np(y_true, y_pred, ids, g, sw, gw)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-12)
    np.testing.assert_allclose(sums, want_s, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(weights, want_w, rtol=1e-12)
    for t, ((loss_t, scale_t), (sums_t, weights_t)) in runs.items():
        assert loss_t == loss, t
        np.testing.assert_array_equal(scale_t, scale)
        np.testing.assert_array_equal(sums_t, sums)
        np.testing.assert_array_equal(weights_t, weights)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    y = np.zeros(4, np.float32)
    ids = np.array([0, 1, 9, 1], np.int32)
    with pytest.raises(ValueError, match=r"group_ids\[2\] = 9 is out of range.*num_groups = 3"):
        _core.cpu_loss(y, y, ids, 3)
    with pytest.raises(ValueError, match=r"sample_weight\[1\] = -1"):
        sw = np.array([1, -1, 1, 1], np.float32)
        _core.cpu_stats(y, y, np.zeros(4, np.int64), 2, sample_weight=sw)
    with pytest.raises(ValueError, match=r"sample_weight\[0\] = nan"):
        sw = np.array([np.nan, 1, 1, 1], np.float32)
        _core.cpu_stats(y, y, np.zeros(4, np.int64), 2, sample_weight=sw)
    with pytest.raises(ValueError, match=r"group_weights\[1\] = -2"):
        _core.cpu_loss(y, y, np.zeros(4, np.int32), 2, group_weights=np.array([1, -2], np.float32))
    with pytest.raises(ValueError, match="num_groups must be positive, got 0"):
        _core.cpu_loss(y, y, np.zeros(4, np.int32), 0)
    with pytest.raises(ValueError, match="same shape"):
        _core.cpu_loss(y, np.zeros(5, np.float32), np.zeros(4, np.int32), 2)
    with pytest.raises(ValueError, match="group_ids has 3 entries but y_true has N = 4"):
        _core.cpu_loss(y, y, np.zeros(3, np.int32), 2)
    with pytest.raises(ValueError, match="group_ids must be int32 or int64"):
        _core.cpu_loss(y, y, np.zeros(4, np.float32), 2)
    with pytest.raises(ValueError, match="float32 or float64"):
        _core.cpu_loss(y.astype(np.float16), y.astype(np.float16), np.zeros(4, np.int32), 2)
    with pytest.raises(ValueError, match=r"group_ids\[2\] = 9"):
        _core.cpu_backward(y, y, ids, np.ones(3, np.float32))


class FakeDeviceArray:
    """Host stand-in exposing __cuda_array_interface__, for the binding's argument checks
    (they run before any CUDA call, so no GPU is needed)."""

    def __init__(self, shape, typestr, ptr=256, strides=None):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": strides,
        }


needs_cuda_build = pytest.mark.skipif(
    not getattr(_core, "with_cuda", False), reason="core module built without CUDA"
)


@needs_cuda_build
def test_strategy_rule_from_n_g_and_dtype():
    assert _core.choose_strategy(1 << 24, 1, "float32") == "shared_runs"
    assert _core.choose_strategy(1 << 24, 2816, "float32") == "shared_runs"  # 2*G*8 <= 44 KiB
    assert _core.choose_strategy(1 << 24, 2817, "float64") == "global_runs"
    assert _core.choose_strategy(1 << 24, 5632, "float16") == "shared_runs"  # float accumulators
    assert _core.choose_strategy(1 << 24, 5633, "bfloat16") == "global_runs"
    assert _core.choose_strategy(255 * 100, 100, "float32") == "global_runs"  # < 256 rows/group
    assert _core.choose_strategy(256 * 100, 100, "float32") == "shared_runs"
    assert _core.choose_strategy(1 << 24, 1_000_000, "float32") == "global_runs"


@needs_cuda_build
def test_deterministic_flag_reads_the_environment(monkeypatch):
    monkeypatch.setenv("GMAE_DETERMINISTIC", "1")
    assert _core.deterministic_from_env()
    monkeypatch.setenv("GMAE_DETERMINISTIC", "0")
    assert not _core.deterministic_from_env()
    monkeypatch.delenv("GMAE_DETERMINISTIC")
    assert not _core.deterministic_from_env()


@needs_cuda_build
def test_cuda_argument_checks_name_the_argument():
    y = FakeDeviceArray((8,), "<f4")
    ids = FakeDeviceArray((8,), "<i4")
    out = FakeDeviceArray((3,), "<f4")
    loss = FakeDeviceArray((1,), "<f4")
    with pytest.raises(ValueError, match="y_pred must have the dtype of y_true"):
        _core.cuda_loss(y, FakeDeviceArray((8,), "<f8"), ids, loss, out)
    with pytest.raises(ValueError, match="group_ids must be int32 or int64"):
        _core.cuda_loss(y, y, FakeDeviceArray((8,), "<f4"), loss, out)
    with pytest.raises(ValueError, match="group_ids has 7 entries but y_true has N = 8"):
        _core.cuda_loss(y, y, FakeDeviceArray((7,), "<i8"), loss, out)
    with pytest.raises(
        ValueError, match=r"scale_out must be a float32 device array of shape \[3\]"
    ):
        _core.cuda_loss(y, y, ids, loss, FakeDeviceArray((3,), "<f8"))
    with pytest.raises(ValueError, match="loss_out must be a one-element"):
        _core.cuda_loss(y, y, ids, FakeDeviceArray((2,), "<f4"), out)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.cuda_loss(FakeDeviceArray((8,), "<f4", strides=(8,)), y, ids, loss, out)
    with pytest.raises(ValueError, match="must be a CUDA device array"):
        _core.cuda_loss(np.zeros(8, np.float32), y, ids, loss, out)
    with pytest.raises(ValueError, match="strategy must be one of"):
        _core.cuda_loss(y, y, ids, loss, out, strategy="fastest")
    with pytest.raises(ValueError, match="not deterministic"):
        _core.cuda_loss(y, y, ids, loss, out, strategy="global_runs", deterministic=True)
    with pytest.raises(ValueError, match="shared_runs.*num_groups = 100000 is too many"):
        _core.cuda_plan(y, y, ids, 100_000, strategy="shared_runs", deterministic=False)
    with pytest.raises(ValueError, match="dtype does not match"):
        _core.cuda_loss(y, y, ids, loss, out, dtype="bfloat16")
