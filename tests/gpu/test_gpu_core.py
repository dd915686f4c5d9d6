"""CUDA kernels through the TF-free core module vs the float64 numpy formula: every forward
strategy (forced by name), sorted and random ids, empty groups, negative ids, 16-bit types,
bad input poisoning, the backward pass, float64 accumulation and determinism."""

import numpy as np
import pytest
from np_reference import grad_np, grouped_mae_np

STRATEGIES = ["shared_runs", "global_runs", "global_direct", "deterministic"]
# Relative tolerance of loss/scale/sums by input dtype: output rounding plus accumulation in
# float (16-bit inputs) or double (float32/float64 inputs).
RTOL = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 2e-6, "float64": 1e-12}
NP_TYPE = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def host_inputs(n, d, g, dtype, layout, weighted, seed=0):
    rng = np.random.default_rng(seed + n + g)
    shape = (n,) if d == 1 else (n, d)
    yt = rng.normal(size=shape)
    yp = rng.normal(size=shape)
    if dtype != "bfloat16":  # round to the input type so the reference sees the same values
        yt = yt.astype(NP_TYPE[dtype]).astype(np.float64)
        yp = yp.astype(NP_TYPE[dtype]).astype(np.float64)
    ids = rng.integers(-1, g, size=n)
    if layout == "sorted":
        ids = np.sort(ids)
    sw = rng.uniform(0, 2, size=n) if weighted else None
    if sw is not None and dtype != "bfloat16":
        sw = sw.astype(NP_TYPE[dtype]).astype(np.float64)
    return yt, yp, ids, sw


def to_device(xp, yt, yp, ids, sw, dtype, id_dtype):
    dev = [xp.device(yt, dtype), xp.device(yp, dtype), xp.device(ids, id_dtype)]
    dev.append(None if sw is None else xp.device(sw, dtype))
    return dev


def back_to_host(xp, arrays):
    """bfloat16 rounds on the way in: the reference must use the device's values."""
    return [None if a is None else xp.host(a) for a in arrays]


def run_loss(core, xp, dev, g, dtype, gw=None, **kw):
    yt, yp, ids, sw = dev
    out_t = "float64" if dtype == "float64" else "float32"
    loss = xp.empty((1,), dtype)
    scale = xp.empty((g,), out_t)
    plan = core.cuda_loss(
        xp.arg(yt),
        xp.arg(yp),
        ids,
        xp.arg(loss),
        scale,
        sample_weight=None if sw is None else xp.arg(sw),
        group_weights=None if gw is None else xp.arg(gw),
        stream=xp.stream(),
        dtype="bfloat16" if dtype == "bfloat16" else None,
        **kw,
    )
    return plan, loss, scale


def run_stats(core, xp, dev, g, dtype, **kw):
    yt, yp, ids, sw = dev
    out_t = "float64" if dtype == "float64" else "float32"
    sums, weights = xp.empty((g,), out_t), xp.empty((g,), out_t)
    plan = core.cuda_stats(
        xp.arg(yt),
        xp.arg(yp),
        ids,
        sums,
        weights,
        sample_weight=None if sw is None else xp.arg(sw),
        stream=xp.stream(),
        dtype="bfloat16" if dtype == "bfloat16" else None,
        **kw,
    )
    return plan, sums, weights


def skip_unsupported(core, xp, strategy, g, dtype):
    if dtype == "bfloat16" and xp.name != "torch":
        pytest.skip("bfloat16 needs PyTorch")
    if strategy == "shared_runs" and core.choose_strategy(1 << 62, g, dtype) != "shared_runs":
        pytest.skip("num_groups does not fit in shared memory")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["sorted", "random"])
@pytest.mark.parametrize(
    "n,d,g,dtype,id_dtype,weighted",
    [
        (300_001, 1, 1, "float32", "int32", False),
        (300_001, 1, 37, "float32", "int64", True),
        (200_000, 1, 2000, "float64", "int32", True),
        (100_000, 1, 50_000, "float32", "int32", False),
        (50_000, 5, 300, "float32", "int32", True),
        (200_003, 1, 100, "float16", "int32", True),
        (100_000, 1, 9, "bfloat16", "int64", False),
    ],
)
def test_forward_matches_numpy(core, xp, strategy, layout, n, d, g, dtype, id_dtype, weighted):
    skip_unsupported(core, xp, strategy, g, dtype)
    host = host_inputs(n, d, g, dtype, layout, weighted)
    dev = to_device(xp, *host, dtype, id_dtype)
    yt, yp, _, sw = back_to_host(xp, dev)
    ids = host[2]
    det = strategy == "deterministic"
    s_ref, w_ref, loss_ref, scale_ref = grouped_mae_np(yt, yp, ids, g, sw)

    plan, sums, weights = run_stats(core, xp, dev, g, dtype, strategy=strategy, deterministic=det)
    assert plan["strategy"] == strategy
    assert plan["vectorized"] == (d == 1)
    rtol = RTOL[dtype]
    np.testing.assert_allclose(xp.host(sums), s_ref, rtol=rtol, atol=rtol * 1e-3)
    np.testing.assert_allclose(xp.host(weights), w_ref, rtol=rtol, atol=rtol * 1e-3)

    plan, loss, scale = run_loss(core, xp, dev, g, dtype, strategy=strategy, deterministic=det)
    assert plan["strategy"] == strategy
    np.testing.assert_allclose(xp.host(loss)[0], loss_ref, rtol=rtol)
    np.testing.assert_allclose(xp.host(scale), scale_ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_group_weights_and_empty_groups(core, xp, strategy):
    g = 64
    host = host_inputs(20_000, 1, 40, "float32", "random", True)  # groups 40..63 are empty
    dev = to_device(xp, *host, "float32", "int32")
    gw_host = np.random.default_rng(1).uniform(0, 2, size=g).astype(np.float32)
    gw_host[3] = 0  # a present group with weight 0
    yt, yp, ids, sw = host
    _, _, loss_ref, scale_ref = grouped_mae_np(yt, yp, ids, g, sw, gw_host)
    _, loss, scale = run_loss(
        core,
        xp,
        dev,
        g,
        "float32",
        gw=xp.device(gw_host, "float32"),
        strategy=strategy,
        deterministic=strategy == "deterministic",
    )
    np.testing.assert_allclose(xp.host(loss)[0], loss_ref, rtol=2e-6)
    got = xp.host(scale)
    np.testing.assert_allclose(got, scale_ref, rtol=2e-6, atol=0)
    assert np.all(got[40:] == 0) and got[3] == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bad", ["id", "weight", "group_weight"])
def test_bad_input_poisons_with_nan(core, xp, strategy, bad):
    g = 16
    yt, yp, ids, sw = host_inputs(5000, 1, g, "float32", "random", True)
    gw = np.ones(g)
    if bad == "id":
        ids[1234] = g + 3
    elif bad == "weight":
        sw[77] = -1.0
    else:
        gw[5] = np.nan
    dev = to_device(xp, yt, yp, ids, sw, "float32", "int32")
    _, loss, scale = run_loss(
        core,
        xp,
        dev,
        g,
        "float32",
        gw=xp.device(gw, "float32"),
        strategy=strategy,
        deterministic=strategy == "deterministic",
    )
    assert np.isnan(xp.host(loss)[0])
    assert np.all(np.isnan(xp.host(scale)))


def test_all_rows_ignored_and_no_rows(core, xp):
    for n in (0, 1000):
        dev = to_device(xp, np.zeros(n), np.ones(n), np.full(n, -1), None, "float32", "int64")
        _, loss, scale = run_loss(core, xp, dev, 3, "float32")
        assert xp.host(loss)[0] == 0.0
        np.testing.assert_array_equal(xp.host(scale), np.zeros(3))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("d", [1, 3])
def test_backward_matches_numpy(core, xp, dtype, d):
    skip_unsupported(core, xp, "global_runs", 1, dtype)
    g = 50
    host = host_inputs(100_001, d, g, dtype, "random", True)
    dev = to_device(xp, *host, dtype, "int32")
    yt, yp, _, sw = back_to_host(xp, dev)
    ids = host[2]
    out_t = "float64" if dtype == "float64" else "float32"
    scale_host = np.random.default_rng(2).uniform(0, 1, size=g)
    scale = xp.device(scale_host, out_t)
    upstream = xp.device(np.array([0.5]), dtype)
    grad = xp.empty(tuple(np.shape(host[0])), dtype)
    core.cuda_backward(
        xp.arg(dev[0]),
        xp.arg(dev[1]),
        dev[2],
        scale,
        xp.arg(upstream),
        xp.arg(grad),
        sample_weight=xp.arg(dev[3]),
        stream=xp.stream(),
        dtype="bfloat16" if dtype == "bfloat16" else None,
    )
    scale_used = xp.host(scale)
    expect = grad_np(yt, yp, ids, scale_used, 0.5, sw)
    np.testing.assert_allclose(xp.host(grad), expect, rtol=RTOL[dtype], atol=1e-30)


def test_float64_accumulation_of_16m_float32_rows(core, xp):
    n = 1 << 24
    rng = np.random.default_rng(5)
    yt = rng.uniform(0, 1, size=n).astype(np.float32)
    yp = (yt + rng.uniform(0, 1e-3, size=n)).astype(np.float32)
    ids = np.zeros(n, np.int32)
    dev = to_device(xp, yt, yp, ids, None, "float32", "int32")
    s_ref, w_ref, _, _ = grouped_mae_np(yt, yp, ids, 1)
    for strategy in ("shared_runs", "global_runs", "deterministic"):
        _, sums, weights = run_stats(
            core,
            xp,
            dev,
            1,
            "float32",
            strategy=strategy,
            deterministic=strategy == "deterministic",
        )
        np.testing.assert_allclose(xp.host(sums)[0], s_ref[0], rtol=1e-6)
        assert xp.host(weights)[0] == n


@pytest.mark.parametrize(
    "g,layout", [(1, "random"), (200, "random"), (5000, "sorted"), (100_000, "random")]
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_deterministic_is_bitwise_reproducible(core, xp, g, layout, dtype):
    host = host_inputs(1_000_003, 1, g, dtype, layout, True, seed=11)
    dev = to_device(xp, *host, dtype, "int32")
    results = []
    for _ in range(3):
        plan, loss, scale = run_loss(core, xp, dev, g, dtype, deterministic=True)
        _, sums, _ = run_stats(core, xp, dev, g, dtype, deterministic=True)
        assert plan["strategy"] == "deterministic"
        results.append([xp.host(loss).tobytes(), xp.host(scale).tobytes(), xp.host(sums).tobytes()])
    assert results[0] == results[1] == results[2]
    yt, yp, _, sw = back_to_host(xp, dev)
    _, _, loss_ref, _ = grouped_mae_np(yt, yp, host[2], g, sw)
    np.testing.assert_allclose(
        np.frombuffer(results[0][0], np.float64)[0], loss_ref, rtol=RTOL[dtype]
    )


def test_environment_variable_selects_deterministic_mode(core, xp, monkeypatch):
    dev = to_device(xp, *host_inputs(10_000, 1, 10, "float32", "random", False), "float32", "int32")
    monkeypatch.setenv("GMAE_DETERMINISTIC", "1")
    assert core.deterministic_from_env()
    plan, _, _ = run_loss(core, xp, dev, 10, "float32")
    assert plan["strategy"] == "deterministic"
    with pytest.raises(ValueError, match="not deterministic"):
        run_loss(core, xp, dev, 10, "float32", strategy="global_runs")
    monkeypatch.setenv("GMAE_DETERMINISTIC", "0")
    plan, _, _ = run_loss(core, xp, dev, 10, "float32")
    assert plan["strategy"] == core.choose_strategy(10_000, 10, "float32")


def test_strategy_rule(core):
    assert core.choose_strategy(1 << 24, 1, "float32") == "shared_runs"
    assert core.choose_strategy(1 << 24, 2816, "float32") == "shared_runs"
    assert core.choose_strategy(1 << 24, 2817, "float32") == "global_runs"
    assert core.choose_strategy(1 << 24, 5632, "float16") == "shared_runs"
    assert core.choose_strategy(1000, 100, "float32") == "global_runs"  # too few rows per group
    assert core.choose_strategy(1 << 24, 1_000_000, "float64") == "global_runs"


def test_forcing_shared_with_too_many_groups_is_an_error(core, xp):
    dev = to_device(xp, *host_inputs(1000, 1, 10, "float32", "random", False), "float32", "int32")
    with pytest.raises(ValueError, match="shared_runs"):
        run_loss(core, xp, dev, 100_000, "float32", strategy="shared_runs", deterministic=False)


def test_argument_errors(core, xp):
    dev = to_device(xp, *host_inputs(100, 1, 4, "float32", "random", False), "float32", "int32")
    with pytest.raises(ValueError, match="strategy must be one of"):
        run_loss(core, xp, dev, 4, "float32", strategy="fastest")
    with pytest.raises(ValueError, match="__cuda_array_interface__"):
        core.cuda_plan(np.zeros(100, np.float32), dev[1], dev[2], 4)
