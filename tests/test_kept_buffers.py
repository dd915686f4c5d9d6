"""The CPU kernels keep their large buffers between calls (KeptBuffer in csrc/tf/kernels.cc):
the forward's float64 workspace, the [G] outputs (scale, sums, weights) and the gradient,
once each is 1 MiB or more. A kept buffer must never leak one call's values into the next,
and must never be handed out while the caller still holds the previous result.

Every check is against the float64 formula (tests/cases.py), and the
results must be bitwise the same as in a process with GMAE_CPU_REUSE_BUFFERS=0 (nothing
kept)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from cases import formula_grad, formula_loss, formula_stats

import grouped_mae_op as gm

# G = 300000: the [G] float32 outputs are 1.2 MB and the workspace 4.8 MB or more, all kept.
# N = 2^19 float32 rows: a 2 MiB gradient, kept.
G = 300_000
N = 1 << 19


def make(seed: int, layout: str):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, G, N).astype(np.int32)
    if layout == "sorted":
        ids.sort()
    else:
        ids[: N // 2] = rng.integers(0, G // 3, N // 2)  # a different set of groups present
    y_true = rng.standard_normal(N).astype(np.float32)
    y_pred = rng.standard_normal(N).astype(np.float32)
    return y_true, y_pred, ids


def fwdbwd(y_true, y_pred, ids):
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = gm.grouped_mae(y_true, y_pred, ids, G)
    return loss, tape.gradient(loss, y_pred)


def stats(y_true, y_pred, ids):
    return gm.grouped_mae_stats(y_true, y_pred, ids, G)


def check(inputs, loss, grad, sums, weights):
    want_s, want_w = formula_stats(*inputs, G)
    want_loss = formula_loss(*inputs, G)
    want_grad = formula_grad(*inputs, G)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-6, atol=0)
    np.testing.assert_allclose(sums.numpy(), want_s, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(weights.numpy(), want_w)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_held_results_survive_later_calls(graph):
    # Call after call on other data, holding every result: none may be overwritten, and
    # none may carry an earlier call's sums (groups present before, absent now, must be 0).
    f = tf.function(fwdbwd) if graph else fwdbwd
    s = tf.function(stats) if graph else stats
    problems = [
        make(seed, layout) for seed, layout in [(1, "uniform"), (2, "sorted"), (3, "uniform")]
    ]
    held = []
    for p in problems:
        args = [tf.constant(x) for x in p]
        held.append((p, *f(*args), *s(*args)))
    for p, loss, grad, sums, weights in held:
        check(p, loss, grad, sums, weights)


def test_released_buffers_are_reused_correctly():
    # Results dropped after each call (a training loop): the kernels get their kept
    # buffers back, and each call must still be exact.
    f = tf.function(fwdbwd)
    s = tf.function(stats)
    for seed, layout in [(4, "uniform"), (5, "sorted"), (6, "uniform"), (4, "uniform")]:
        p = make(seed, layout)
        args = [tf.constant(x) for x in p]
        loss, grad = f(*args)
        sums, weights = s(*args)
        check(p, loss, grad, sums, weights)
        del loss, grad, sums, weights


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, tensorflow as tf
    sys.path.insert(0, {tests!r})
    from test_kept_buffers import fwdbwd, make, stats
    out = []
    for seed, layout in [(7, "uniform"), (8, "sorted"), (7, "uniform")]:
        args = [tf.constant(x) for x in make(seed, layout)]
        loss, grad = fwdbwd(*args)
        sums, weights = stats(*args)
        out += [np.asarray(loss).ravel(), grad.numpy(), sums.numpy(), weights.numpy()]
    np.savez(sys.argv[1], *out)
    """
)


def test_same_bits_with_and_without_kept_buffers(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    results = []
    for reuse in ("1", "0"):
        path = tmp_path / f"reuse{reuse}.npz"
        env = dict(os.environ, GMAE_CPU_REUSE_BUFFERS=reuse, TF_CPP_MIN_LOG_LEVEL="2")
        subprocess.run(
            [sys.executable, "-c", _CHILD.format(tests=here), str(path)],
            env=env,
            check=True,
            timeout=600,
        )
        with np.load(path) as z:
            results.append([z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))])
    assert len(results[0]) == len(results[1]) == 12
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
