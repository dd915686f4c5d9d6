"""Quick agreement check of the CPU kernel's code paths against a float64 numpy formula.

Not a test (tests/ has those); a fast sanity sweep to run after each change to
csrc/cpu/grouped_mae_cpu.h. Covers every accumulation path (one id per block, runs,
scatter with and without copies, the per-row path for ignored rows), sample weights, D > 1,
16-bit inputs, errors (the lowest bad row is reported) and run-to-run determinism.
    python benchmarks/check_paths.py
"""

import numpy as np
import tensorflow as tf

import grouped_mae_op as gm


def formula(yt, yp, ids, g, sw=None, gw=None):
    yt = yt.astype(np.float64)
    yp = yp.astype(np.float64)
    e = np.abs(yp - yt).reshape(len(ids), -1).mean(axis=1)
    w = np.ones(len(ids)) if sw is None else sw.astype(np.float64)
    keep = ids >= 0
    s = np.bincount(ids[keep], weights=(w * e)[keep], minlength=g)
    W = np.bincount(ids[keep], weights=w[keep], minlength=g)
    v = np.ones(g) if gw is None else gw.astype(np.float64)
    present = W != 0
    vs = v[present].sum()
    loss = 0.0 if vs == 0 else (v[present] * s[present] / W[present]).sum() / vs
    scale = np.where(present & (vs != 0), v / np.where(present, W, 1) / (vs if vs else 1), 0)
    row = np.where(keep, w * scale[np.maximum(ids, 0)], 0) / (yt.size // len(ids))
    grad = np.sign(yp - yt) * row.reshape((-1,) + (1,) * (yt.ndim - 1))
    return loss, s, W, grad


def layouts(n, g, rng):
    yield "sorted", np.sort(rng.integers(0, g, n)).astype(np.int32)
    yield "uniform", rng.integers(0, g, n).astype(np.int32)
    yield "zipf", ((rng.zipf(1.3, n) - 1) % g).astype(np.int32)
    yield "one-id", np.full(n, g - 1, np.int32)
    ids = rng.integers(0, g, n).astype(np.int32)
    ids[rng.random(n) < 0.01] = -1
    yield "padded", ids


def main():
    rng = np.random.default_rng(0)
    worst = 0.0
    cases = 0
    for n in (1, 255, 257, 1000, 70_001, 300_000):
        for g in (1, 7, 256, 257, 5000, 200_000):
            for name, ids in layouts(n, g, rng):
                for d, weighted, dtype in (
                    (1, False, np.float32),
                    (1, True, np.float32),
                    (3, True, np.float32),
                    (1, False, np.float16),
                    (1, True, np.float64),
                ):
                    shape = (n,) if d == 1 else (n, d)
                    yt = rng.standard_normal(shape).astype(dtype)
                    yp = rng.standard_normal(shape).astype(dtype)
                    sw = rng.random(n).astype(dtype) if weighted else None
                    yp_t = tf.constant(yp)
                    with tf.GradientTape() as tape:
                        tape.watch(yp_t)
                        loss = gm.grouped_mae(yt, yp_t, ids, g, sample_weight=sw)
                    grad = tape.gradient(loss, yp_t).numpy().astype(np.float64)
                    s, w = gm.grouped_mae_stats(yt, yp, ids, g, sample_weight=sw)
                    ref_loss, ref_s, ref_w, ref_grad = formula(yt, yp, ids, g, sw)
                    tol = 2e-3 if dtype == np.float16 else 1e-5
                    scale = max(1.0, abs(ref_loss))
                    err = abs(float(loss) - ref_loss) / scale
                    assert err <= tol, (n, g, name, d, weighted, dtype, float(loss), ref_loss)
                    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5, atol=1e-5 * n)
                    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-5, atol=1e-6)
                    gtol = 1e-2 if dtype == np.float16 else 1e-5
                    np.testing.assert_allclose(
                        grad, ref_grad, rtol=gtol, atol=gtol * np.abs(ref_grad).max() + 1e-30
                    )
                    if n >= 70_001 and d == 1 and not weighted and dtype == np.float32:
                        again = gm.grouped_mae(yt, yp_t, ids, g)
                        assert np.float32(again).tobytes() == np.float32(loss).tobytes()
                    worst = max(worst, err)
                    cases += 1
    # Errors: the lowest bad row wins, across blocks and shards.
    n = 300_000
    yt = np.zeros(n, np.float32)
    ids = np.zeros(n, np.int32)
    ids[[200_000, 100_001]] = 9
    # Through tf.function so the ids are not known statically (else Python rejects them).
    loss_fn = tf.function(lambda yt, ids, sw: gm.grouped_mae(yt, yt, ids, 5, sample_weight=sw))
    try:
        loss_fn(yt, ids, np.ones(n, np.float32))
        raise AssertionError("no error")
    except tf.errors.InvalidArgumentError as e:
        assert "group_ids[100001] = 9" in str(e), str(e)
    sw = np.ones(n, np.float32)
    sw[[250_000, 120_000]] = [-1, np.nan]
    ids[:] = 0
    try:
        loss_fn(yt, ids, sw)
        raise AssertionError("no error")
    except tf.errors.InvalidArgumentError as e:
        assert "sample_weight[120000] = nan" in str(e), str(e)
    # Gradient buffer reuse (kernels.cc): a gradient still held must not be overwritten, and
    # a reused buffer must hold the new values.
    n = 1 << 20
    ids = rng.integers(0, 10, n).astype(np.int32)

    @tf.function
    def grad_fn(yt, yp):
        with tf.GradientTape() as tape:
            tape.watch(yp)
            loss = gm.grouped_mae(yt, yp, ids, 10)
        return tape.gradient(loss, yp)

    yt = np.zeros(n, np.float32)
    a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    g1 = grad_fn(yt, a)
    kept = g1.numpy().copy()
    g2 = grad_fn(yt, b)
    assert np.array_equal(g1.numpy(), kept), "a held gradient was overwritten"
    np.testing.assert_allclose(g2.numpy(), formula(yt, b, ids, 10)[3], rtol=1e-5)
    del g1, g2
    for _ in range(3):
        for x in (a, b):
            np.testing.assert_allclose(
                grad_fn(yt, x).numpy(), formula(yt, x, ids, 10)[3], rtol=1e-5
            )
    # Precision contract: 16M float32 rows in one group.
    n = 1 << 24
    yp = rng.standard_normal(n).astype(np.float32)
    ref = np.abs(yp.astype(np.float64)).mean()
    got = float(gm.grouped_mae_stats(np.zeros(n, np.float32), yp, np.zeros(n, np.int32), 1)[0][0])
    rel16m = abs(got / n - ref) / ref
    assert rel16m < 1e-6, rel16m
    print(
        f"{cases} cases agree; worst loss rel err {worst:.2e}; 16M-row one-group rel err "
        f"{rel16m:.2e}; error messages name the lowest bad row"
    )


if __name__ == "__main__":
    main()
