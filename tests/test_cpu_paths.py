"""Each path of the CPU forward (csrc/cpu/grouped_mae_cpu.h) against the float64 formula:
the sparse path (few rows, many groups), blocks of one id, long and short runs of one id
(sorted ids), the scatter with per-copy partials (G <= 256) and without, and blocks with
ignored rows; int32 and int64 ids.
Loss, per-group statistics and the gradient, with and without weights, D = 1 and D = 3."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import tensorflow as tf
from cases import formula_grad, formula_loss, formula_stats

import grouped_mae_op as gm
from grouped_mae_op import reference

RTOL = {tf.float32: 1e-6, tf.float64: 1e-12}
# A short run's S and W are differences of prefix sums over a quarter block (64 rows), exact to a
# few ulps of that prefix sum, not of the run's own sum: up to 5e-14 absolute for these inputs
# (largest over 240 random float64 cases). A run with a tiny sum can therefore be off by more
# than 1e-12 relative (one seed gave 1.3e-12 on S = 0.0026), and its gradient, scaled by 1 / W,
# by as much relative to a small W. So float64 gets an absolute bound on S and W and a looser
# relative one on the gradient.
STATS_ATOL = {tf.float32: 0.0, tf.float64: 1e-12}
GRAD_RTOL = {tf.float32: 1e-6, tf.float64: 1e-10}
KERNEL = tf.errors.InvalidArgumentError


def make_ids(kind: str, n: int, g: int, rng) -> np.ndarray:
    if kind in ("sparse", "scatter"):
        ids = rng.integers(0, g, n)
    elif kind in ("one_id", "short_runs", "long_runs", "mixed_runs"):
        lo, hi = {
            "one_id": (600, 1500),  # most 256-row blocks hold one id
            "short_runs": (2, 12),
            "long_runs": (40, 400),
            "mixed_runs": (1, 300),
        }[kind]
        lengths = rng.integers(lo, hi, n)
        ids = np.repeat(np.sort(rng.choice(g, size=n, replace=True)), lengths)[:n]
    else:
        raise ValueError(kind)
    return ids.astype(np.int32)


def check_float32_against_formula(y_true, y_pred, ids, g, sw=None, num_groups=None):
    """S, W, loss and gradient of float32 inputs against the float64 formula, rtol 1e-6;
    unweighted W (row counts) exactly. num_groups is what the op gets (default g)."""
    sums, weights = gm.grouped_mae_stats(y_true, y_pred, ids, g, sample_weight=sw)
    want_s, want_w = formula_stats(y_true, y_pred, ids, g, sw)
    np.testing.assert_allclose(sums.numpy(), want_s, rtol=1e-6, atol=0)
    if sw is None:
        np.testing.assert_array_equal(weights.numpy(), want_w)
    else:
        np.testing.assert_allclose(weights.numpy(), want_w, rtol=1e-6, atol=0)
    yp = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(yp)
        loss = gm.grouped_mae(
            y_true, yp, ids, g if num_groups is None else num_groups, sample_weight=sw
        )
    np.testing.assert_allclose(float(loss), formula_loss(y_true, y_pred, ids, g, sw), rtol=1e-6)
    want_grad = formula_grad(y_true, y_pred, ids, g, sw)
    np.testing.assert_allclose(tape.gradient(loss, yp).numpy(), want_grad, rtol=1e-6, atol=0)


# (kind, n, g): the sparse path needs g >= 4096 and n * 4 <= g; blocks are 256 rows.
PROBLEMS = [
    ("sparse", 700, 5000),
    ("sparse", 1024, 100_000),
    ("one_id", 5000, 20),
    ("short_runs", 3000, 4000),
    ("long_runs", 3000, 200),
    ("mixed_runs", 3000, 2000),
    ("scatter", 3000, 50),  # per-copy partials
    ("scatter", 3000, 3000),  # one partial
]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("kind, n, g", PROBLEMS)
def test_path_matches_formula(kind, n, g, ignored, weighted, d, dtype):
    # A seed that is the same in every process (hash() of a str is not).
    rng = np.random.default_rng(zlib.crc32(repr((kind, n, g, ignored, weighted, d)).encode()))
    ids = make_ids(kind, n, g, rng)
    if ignored:
        ids[rng.random(n) < 0.1] = -1
    shape = (n,) if d == 1 else (n, d)
    np_dtype = dtype.as_numpy_dtype
    y_true = rng.standard_normal(shape).astype(np_dtype)
    y_pred = rng.standard_normal(shape).astype(np_dtype)
    sw = rng.random(n).astype(np_dtype) * 2 if weighted else None
    if weighted:
        sw[rng.random(n) < 0.05] = 0  # zero weights, and whole groups of weight 0
    gw = rng.random(g).astype(np_dtype) if weighted else None

    yp = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(yp)
        loss = gm.grouped_mae(y_true, yp, ids, g, sample_weight=sw, group_weights=gw)
    grad = tape.gradient(loss, yp)
    sums, weights = gm.grouped_mae_stats(y_true, y_pred, ids, g, sample_weight=sw)

    rtol = RTOL[dtype]
    want_loss = formula_loss(y_true, y_pred, ids, g, sw, gw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=rtol)
    np.testing.assert_allclose(
        float(loss),
        float(reference.grouped_mae(y_true, y_pred, ids, g, sample_weight=sw, group_weights=gw)),
        rtol=2 * rtol,
    )
    want_s, want_w = formula_stats(y_true, y_pred, ids, g, sw)
    atol = STATS_ATOL[dtype]
    np.testing.assert_allclose(sums.numpy(), want_s, rtol=rtol, atol=atol)
    np.testing.assert_allclose(weights.numpy(), want_w, rtol=rtol, atol=atol)
    assert np.all(sums.numpy()[want_w == 0] == 0)  # groups without rows are exactly 0
    want_grad = formula_grad(y_true, y_pred, ids, g, sw, gw)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=GRAD_RTOL[dtype], atol=0)


def test_sparse_and_dense_paths_agree_at_the_boundary():
    # 1000 rows: G = 4095 takes the dense path, G = 4096 the sparse one (n * 4 <= G).
    rng = np.random.default_rng(7)
    n = 1000
    ids = rng.integers(-1, 900, n).astype(np.int32)
    y_true = rng.standard_normal(n)
    y_pred = rng.standard_normal(n)
    sw = rng.random(n)
    losses = [float(gm.grouped_mae(y_true, y_pred, ids, g, sample_weight=sw)) for g in (4095, 4096)]
    want = formula_loss(y_true, y_pred, ids, 4096, sw)
    np.testing.assert_allclose(losses, [want, want], rtol=1e-13)


def test_sparse_path_reports_the_first_bad_row():
    # Inside tf.function, so that the kernel (not the Python-side check of constant inputs)
    # finds the bad rows.
    n, g = 500, 10_000
    loss = tf.function(
        lambda ids, sw: gm.grouped_mae(tf.zeros([n]), tf.ones([n]), ids, g, sample_weight=sw)
    )
    stats = tf.function(
        lambda ids, sw: gm.grouped_mae_stats(tf.zeros([n]), tf.ones([n]), ids, g, sample_weight=sw)
    )
    ids = np.arange(n, dtype=np.int32)
    ids[[300, 40]] = [g + 5, g]
    ones = tf.ones([n])
    with pytest.raises(KERNEL, match=r"group_ids\[40\] = 10000 is out of range"):
        loss(tf.constant(ids), ones)
    sw = np.ones(n, np.float32)
    sw[[200, 90]] = [-2, np.nan]
    ids = np.arange(n, dtype=np.int32)
    ids[90] = -1  # an ignored row's weight is not checked, as on the dense path
    for f in (loss, stats):
        with pytest.raises(KERNEL, match=r"sample_weight\[200\] = -2"):
            f(tf.constant(ids), tf.constant(sw))


def test_sparse_path_repeated_calls_do_not_see_old_groups():
    # The sparse path clears only the groups it touches: a second call with other groups
    # must not see the first call's sums. At G = 100000 the kernel keeps its 1.6 MB
    # workspace between calls, so the second call gets the first one's buffer back.
    g = 100_000
    f = tf.function(lambda t, p, ids: gm.grouped_mae_stats(t, p, ids, g))
    a = f(tf.ones([100]), tf.zeros([100]), tf.range(100))
    b = f(tf.ones([100]), tf.zeros([100]), tf.range(100, 200))
    assert float(tf.reduce_sum(a[1])) == 100 and float(tf.reduce_sum(b[1])) == 100
    np.testing.assert_array_equal(b[1].numpy()[:100], 0)
    np.testing.assert_array_equal(b[1].numpy()[100:200], 1)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind, n, g", PROBLEMS)
def test_int64_ids(kind, n, g, weighted):
    # int64 ids take their own id comparisons (two per SSE2 instruction in run_ends).
    rng = np.random.default_rng(11)
    ids = make_ids(kind, n, g, rng).astype(np.int64)
    # Ignored rows in the first block only: a block with one takes the per-row loop.
    ids[:64][rng.random(64) < 0.1] = -1
    y_true = rng.standard_normal(n).astype(np.float32)
    y_pred = rng.standard_normal(n).astype(np.float32)
    sw = rng.random(n).astype(np.float32) if weighted else None
    check_float32_against_formula(y_true, y_pred, ids, g, sw, num_groups=np.int64(g))


@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("odd", ["other_group", "ignored", "out_of_range"])
def test_one_odd_id_inside_a_block_of_one_id(odd, ids_dtype):
    # A block whose first and last ids agree takes the one-group check, which compares 64
    # bytes of ids at a time: one different id anywhere in it (each 64-byte chunk, and the
    # rows after the last whole chunk in a short final block) must send the block down
    # another path. Blocks are 256 rows; the last block here has 200.
    n, g = 3 * 256 + 200, 8
    rng = np.random.default_rng(5)
    y_true = rng.standard_normal(n).astype(np.float32)
    y_pred = rng.standard_normal(n).astype(np.float32)
    for row in (1, 15, 16, 63, 64, 130, 254, 256 + 100, 768 + 1, 768 + 191, 768 + 198):
        ids = np.full(n, 3, dtype=ids_dtype)
        ids[row] = {"other_group": 6, "ignored": -1, "out_of_range": g}[odd]
        if odd == "out_of_range":  # in a graph, so that the kernel (not Python) checks
            f = tf.function(lambda i: gm.grouped_mae_stats(y_true, y_pred, i, g))
            with pytest.raises(KERNEL, match=rf"group_ids\[{row}\] = {g} is out of range"):
                f(tf.constant(ids))
            continue
        check_float32_against_formula(y_true, y_pred, ids, g)


@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("pattern", ["runs_end_at_probes", "sorted_then_shuffled", "pairs"])
def test_blocks_the_unsorted_probe_misjudges(pattern, ids_dtype):
    # `looks_unsorted` samples rows 32k and 32k + 1 of a 256-row block. These blocks fool it
    # one way or the other: runs of 32 rows that end exactly at the sampled rows (scattered
    # though sorted), a sorted half and a shuffled half, and runs of 2. Each must still be
    # summed exactly, whichever path it takes.
    rng = np.random.default_rng(9)
    g, blocks = 600, 6
    parts = []
    for b in range(blocks):
        if pattern == "runs_end_at_probes":  # row 0 alone, then runs of 32 rows ending at 32k
            ids = np.concatenate([[b * 10], np.repeat(b * 10 + 1 + np.arange(8), 32)])[:256]
        elif pattern == "sorted_then_shuffled":
            ids = np.concatenate([np.repeat(b * 40 + np.arange(4), 32), rng.integers(0, g, 128)])
        else:  # runs of 2 starting at odd rows: every sampled pair differs
            ids = np.concatenate([[b], np.repeat(100 + b * 50 + np.arange(128), 2)])[:256]
        parts.append(ids)
    ids = np.concatenate(parts).astype(ids_dtype)
    n = len(ids)
    y_true = rng.standard_normal(n).astype(np.float32)
    y_pred = rng.standard_normal(n).astype(np.float32)
    check_float32_against_formula(y_true, y_pred, ids, g)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("kind, n, g", PROBLEMS)
def test_a_nan_stays_in_its_own_group(kind, n, g, value):
    # Each path keeps groups apart (running sums are reset between runs; the prefix sums of
    # short runs are not used when a block's sum is not finite): a NaN or Inf error must
    # make its own group's S NaN or Inf and leave every other group exact.
    rng = np.random.default_rng(3)
    ids = make_ids(kind, n, g, rng)
    y_true = rng.standard_normal(n).astype(np.float32)
    y_pred = rng.standard_normal(n).astype(np.float32)
    for row in (0, n // 2, n - 1):
        yp = y_pred.copy()
        yp[row] = value
        sums, weights = gm.grouped_mae_stats(y_true, yp, ids, g)
        want_s, want_w = formula_stats(y_true, yp, ids, g)
        bad = ids[row]
        assert np.isnan(sums.numpy()[bad]) if np.isnan(value) else sums.numpy()[bad] == np.inf
        others = np.arange(g) != bad
        np.testing.assert_allclose(sums.numpy()[others], want_s[others], rtol=1e-6, atol=0)
        np.testing.assert_allclose(weights.numpy(), want_w, rtol=1e-6, atol=0)
