"""The benchmark CLI (python -m grouped_mae_op.bench) on a tiny grid: it runs every
implementation, times per call, in graph and eagerly, agrees with the reference, and writes the
table, the JSON and the plot. Speed itself is never asserted (see the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def test_bench_cli_writes_table_json_and_plot(tmp_path):
    cmd = [
        sys.executable, "-m", "grouped_mae_op.bench",
        "--n", "2^10,2^12", "--g", "10,5000", "--layout", "sorted,uniform",
        "--graph-n", "2^10", "--graph-iters", "2", "--graph-copies", "2", "--eager-n", "2^12",
        "--reps", "2", "--min-time", "0", "--no-memory", "--out", str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "vs comp" in out and "x floor" in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 10_000
    rows = result["rows"]
    # 2 N x 2 G x 2 layouts x 2 modes, the N = 2^10 ones again in graph, the N = 2^12 ones
    # again eagerly.
    assert len(rows) == 16 + 8 + 8
    assert sum(r["timing"] == "graph" and r["n"] == 2**10 for r in rows) == 8
    assert sum(r["timing"] == "eager" and r["n"] == 2**12 for r in rows) == 8
    for r in rows:
        ms = r["median_ms"]
        want = {"fused", "reference", "composite", "floor", "empty"}
        if r["layout"] == "sorted":
            want.add("segment_mean")
        assert set(ms) == want, r
        assert all(v > 0 for v in ms.values())
        assert r["speedup_vs_composite"] == pytest.approx(ms["composite"] / ms["fused"])
        if r["timing"] in ("call", "eager"):
            assert r["fused_matches_reference"], r["loss"]
            assert abs(r["loss"]["fused"] - r["loss"]["composite"]) < 1e-4
    assert result["machine"]["tensorflow"]
    assert result["machine"]["build_info"]["xla"] in (True, False)


def test_quick_profile_times_the_forward_alone_only_where_it_is_cheap():
    from grouped_mae_op import bench

    quick = bench.parse_args([])
    assert quick.n == [2**10, 2**20, 2**24] and quick.g == [10, 1000, 100_000]
    assert bench._plan(quick, 2**10) == [
        ("fwd", "call"),
        ("fwd", "graph"),
        ("fwd", "eager"),
        ("fwdbwd", "call"),
        ("fwdbwd", "graph"),
        ("fwdbwd", "eager"),
    ]
    assert bench._plan(quick, 2**24) == [("fwdbwd", "call")]
    # A grid asked for explicitly is timed in every mode asked for.
    assert bench._plan(bench.parse_args(["--n", "2^24"]), 2**24) == [
        ("fwd", "call"),
        ("fwdbwd", "call"),
    ]
    assert bench._plan(bench.parse_args(["--mode", "fwd"]), 2**24) == [("fwd", "call")]
    full = bench.parse_args(["--full"])
    assert all(("fwd", "call") in bench._plan(full, n) for n in full.n)


@pytest.mark.parametrize("order", ["round-robin", "back-to-back"])
@pytest.mark.parametrize("pause_ms", [0.0, 2.0])
def test_timing_order_and_pause(monkeypatch, order, pause_ms):
    import tensorflow as tf

    from grouped_mae_op import bench

    args = bench.parse_args(["--order", order, "--pause-ms", str(pause_ms)])
    assert (args.order, args.pause_ms) == (order, pause_ms)
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("sleep", s)))

    def fn(name, value):
        def call():
            events.append(("call", name))
            return tf.constant(value)

        return call

    fns = {"a": fn("a", 1.5), "b": fn("b", 2.5)}
    times, values = bench.time_side_by_side(
        fns, (), "cpu", reps=3, min_time=0.0, max_time=100.0, warmup=1,
        order=args.order, pause=args.pause_ms / 1e3,
    )  # fmt: skip
    assert values == {"a": 1.5, "b": 2.5}
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    timed = events[2:]  # after one warm-up call of each, never paused
    assert events[:2] == [("call", "a"), ("call", "b")]
    names = [e[1] for e in timed if e[0] == "call"]
    assert names == (["a", "b"] * 3 if order == "round-robin" else ["a"] * 3 + ["b"] * 3)
    if pause_ms:
        # One pause right before each timed call.
        assert timed == [e for name in names for e in (("sleep", pause_ms / 1e3), ("call", name))]
    else:
        assert all(e[0] == "call" for e in timed)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--graph-iters", "0"], "--graph-iters must be at least 1, got 0"),
        (["--graph-copies", "-2"], "--graph-copies must be at least 1, got -2"),
        (["--reps", "0"], "--reps must be at least 1, got 0"),
        (["--d", "0"], "--d must be at least 1, got 0"),
        (["--n", "2^10,0"], "--n must be at least 1, got 0"),
        (["--g", "-5"], "--g must be at least 1, got -5"),
        (["--pause-ms", "-1"], "--pause-ms must be at least 0, got -1.0"),
        (["--min-time", "nan"], "--min-time must be at least 0, got nan"),
        (["--max-time", "-3"], "--max-time must be at least 0, got -3.0"),
    ],
)
def test_out_of_range_options_are_rejected_by_name(capsys, argv, message):
    from grouped_mae_op import bench

    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
