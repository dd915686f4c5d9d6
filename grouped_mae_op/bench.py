"""Microbenchmarks: the fused op against what users write today, and against memory speed.

    python -m grouped_mae_op.bench            # --quick: the issue's targets, a few minutes
    python -m grouped_mae_op.bench --full     # the whole grid
    python -m grouped_mae_op.bench --n 2^20 --g 10,1000 --layout zipf --mode fwdbwd

Implementations, timed side by side (round-robin within each repetition, so a busy machine
slows all of them alike; --order back-to-back runs each one's repetitions in a row instead, and
--pause-ms sleeps before each timed call), each inside one tf.function, warmed up, median of
the repetitions:
  fused         grouped_mae_op.grouped_mae (this package's op)
  reference     grouped_mae_op.reference.grouped_mae (pure-TF composite: unsorted_segment_sum
                and element-wise ops, with the same checks)
  segment_mean  the seed article's reduce_mean(segment_mean(|y_pred - y_true|, ids)): sorted ids
                only, and WRONG whenever a group is empty (it averages empty groups in as 0)
  floor         one streaming read of the inputs (y_true, y_pred, group_ids: 12 bytes a row for
                float32): reduce_sum of each, in TF's own thread pool; a lower bound for the
                forward, which must read them all once
  empty         a tf.function with the same inputs that does nothing: TF's fixed cost per call,
                which bounds every speedup at small N
Modes: fwd (the loss) and fwdbwd (the loss and its gradient with respect to y_pred).
Timing: "call" is the time of one call of the tf.function, TF's fixed cost per call included
(the "empty" column, ~0.4 ms on a small VM: it caps every speedup at small N). For the N in
--graph-n (2^10 by default) each configuration is also timed "graph": per computation inside
one tf.function that runs it K x U times (a tf.while_loop of K iterations over U copies of the
inputs), which is what the loss costs inside a training step. For the N in --eager-n (2^10 by
default) it is also timed "eager": one call without tf.function (eager ops, and a GradientTape
for fwdbwd), as in a model compiled with run_eagerly=True or an eager custom training loop.

Writes to --out (default bench_results/): results.json (every timing, the machine, TF, the build),
results.png (time against N per implementation; speedup of fused over the composite). Prints a
table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

import grouped_mae_op as gm  # noqa: E402
from grouped_mae_op import reference  # noqa: E402

IMPLS = ("fused", "reference", "composite", "segment_mean", "floor", "empty")
MODES = ("fwd", "fwdbwd")
LAYOUTS = ("sorted", "uniform", "zipf")
DTYPES = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
}
PROFILES = {
    # The issue's targets: N = 1K, 1M, 16M; G = 10, 1000, 100000; sorted and unsorted ids.
    "quick": dict(
        n=[2**10, 2**20, 2**24],
        g=[10, 1000, 100_000],
        layout=["sorted", "uniform"],
        dtype=["float32"],
        reps=7,
        min_time=0.4,
        graph_n=[2**10],
        eager_n=[2**10],
        # The forward alone only where it is cheap: at 16M rows the reference takes a second
        # a call, and the targets are for fwd+bwd. `--mode fwd` times it at every N.
        fwd_n=[2**10, 2**20],
    ),
    "full": dict(
        n=[2**k for k in range(10, 25, 2)],
        g=[1, 10, 100, 1000, 10**4, 10**5, 10**6],
        layout=list(LAYOUTS),
        dtype=["float32", "float16", "float64"],
        reps=9,
        min_time=0.5,
        graph_n=[2**10, 2**12, 2**14],
        eager_n=[2**10, 2**12, 2**14],
        fwd_n=None,  # every N
    ),
}


# ----------------------------------------------------------------------------------------------
# Inputs and implementations.


def make_inputs(n: int, g: int, layout: str, dtype: str, d: int, seed: int = 0):
    """numpy arrays y_true, y_pred [n] or [n, d] and int32 ids [n] in [0, g)."""
    rng = np.random.default_rng(seed)
    shape = (n,) if d == 1 else (n, d)
    np_dtype = np.float32 if dtype in ("bfloat16", "float16") else np.dtype(dtype)
    y_true = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype, copy=False)
    y_pred = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype, copy=False)
    if layout == "zipf":
        # Skewed group sizes: group k gets a share ~ 1 / (k + 1)^1.3, ids shuffled.
        ids = ((rng.zipf(1.3, n) - 1) % g).astype(np.int32)
    else:
        ids = rng.integers(0, g, n, dtype=np.int32)
        if layout == "sorted":
            ids.sort()
    return y_true, y_pred, ids


def _segment_mean_loss(y_true, y_pred, ids, g):
    del g  # segment_mean sizes its output by max(ids) + 1
    err = tf.abs(y_pred - y_true)
    if err.shape.rank > 1:
        err = tf.reduce_mean(err, axis=list(range(1, err.shape.rank)))
    return tf.reduce_mean(tf.math.segment_mean(err, ids))


def _composite_loss(y_true, y_pred, ids, g):
    # The right composite as users write it: unsorted_segment_sum in the inputs' dtype, empty
    # groups left out. Fewer passes than `reference` (no float64 casts, no checks, no
    # sample-weight or padding handling), and it loses accuracy in float32 at large N.
    err = tf.abs(y_pred - y_true)
    if err.shape.rank > 1:
        err = tf.reduce_mean(err, axis=list(range(1, err.shape.rank)))
    sums = tf.math.unsorted_segment_sum(err, ids, g)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(err), ids, g)
    present = tf.reduce_sum(tf.cast(counts > 0, err.dtype))
    return tf.reduce_sum(tf.math.divide_no_nan(sums, counts)) / tf.maximum(present, 1)


def _floor(y_true, y_pred, ids):
    # One read of every input byte; the three scalars are returned so nothing is pruned.
    return tf.reduce_sum(y_true), tf.reduce_sum(y_pred), tf.reduce_sum(ids)


def _empty(y_true, y_pred, ids):
    del y_pred, ids
    return tf.identity(y_true[:1])


LOSSES = {
    "fused": lambda yt, yp, ids, g: gm.grouped_mae(yt, yp, ids, g),
    "reference": lambda yt, yp, ids, g: reference.grouped_mae(yt, yp, ids, g),
    "composite": _composite_loss,
    "segment_mean": _segment_mean_loss,
}


def _body(impl: str, mode: str, g: int):
    """A Python function (y_true, y_pred, ids) -> loss, or (loss, grad wrt y_pred)."""
    if impl == "floor":
        return _floor
    if impl == "empty":
        return _empty
    loss_fn = LOSSES[impl]
    if mode == "fwd":
        return lambda yt, yp, ids: loss_fn(yt, yp, ids, g)

    def fwdbwd(yt, yp, ids):
        with tf.GradientTape() as tape:
            tape.watch(yp)
            loss = loss_fn(yt, yp, ids, g)
        return loss, tape.gradient(loss, yp)

    return fwdbwd


def _consume(out) -> tf.Tensor:
    """A float32 scalar that reads every element of every output (as a training step's later
    ops would: the optimizer reads the whole gradient), so that none can be pruned."""
    parts = [tf.cast(t, tf.float32) if t.dtype != tf.float32 else t for t in tf.nest.flatten(out)]
    return tf.add_n([t if t.shape.rank == 0 else tf.reduce_sum(t) for t in parts])


def build_fn(impl: str, mode: str, g: int, in_graph: int = 0):
    """A tf.function of (y_true, y_pred, ids), or with in_graph = K > 0 of three lists.

    With in_graph = K it runs a tf.while_loop of K iterations, each computing the loss (and
    gradient) once per copy of the inputs in the lists (distinct tensors, so that TF cannot
    merge the computations) and reading every output once. Its time / (K * copies) is the
    cost of one computation inside a larger graph (a training step), without TF's fixed cost
    per call.
    """
    body = _body(impl, mode, g)
    if not in_graph:
        return tf.function(body)

    def looped(yts, yps, idss):
        def step(i, acc):
            outs = [body(yt, yp, ids) for yt, yp, ids in zip(yts, yps, idss, strict=True)]
            return i + 1, acc + tf.add_n([_consume(o) for o in outs])

        return tf.while_loop(lambda i, acc: i < in_graph, step, (0, 0.0))[1]

    return tf.function(looped)


def graph_inputs(inputs, copies: int):
    """`copies` distinct copies of each input tensor, as three lists (for build_fn in_graph)."""
    return tuple([tf.constant(t.numpy()) for _ in range(copies)] for t in inputs)


def applicable(impl: str, layout: str) -> bool:
    return impl != "segment_mean" or layout == "sorted"


# ----------------------------------------------------------------------------------------------
# Timing.


def _sync(device: str) -> None:
    if device == "gpu":
        tf.test.experimental.sync_devices()


def _first_value(out) -> float:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return float(np.ravel(out.numpy())[0])


def time_side_by_side(
    fns: dict,
    args,
    device: str,
    reps: int,
    min_time: float,
    max_time: float,
    warmup: int = 2,
    order: str = "round-robin",
    pause: float = 0.0,
):
    """{name: [seconds per call]}, {name: first output value}.

    order = "round-robin": every repetition runs each fn once, in turn (a busy machine slows
    all of them alike). "back-to-back": all repetitions of one fn, then the next. Either way
    each fn repeats `reps` times and for at least `min_time` seconds, but stops after 3
    repetitions once `max_time` seconds have passed (the composite takes seconds a call at 16M
    rows). With pause > 0, each timed call starts after sleeping that many seconds.
    """
    values = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            out = fn(*args)
            _sync(device)
            if time.perf_counter() - t0 > 1.0:
                break  # a second of tracing and running: warm enough (the median discards more)
        values[name] = _first_value(out)
    times = {name: [] for name in fns}
    turns = [list(fns)] if order == "round-robin" else [[name] for name in fns]
    # As timeit does: no garbage collection inside the timed calls (a full collection of
    # TF's object graph takes milliseconds and would land in whichever call triggers it).
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for names in turns:
            fns_now = {name: fns[name] for name in names}
            _time_repeated(fns_now, args, device, reps, min_time, max_time, pause, times)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, values


def _time_repeated(fns, args, device, reps, min_time, max_time, pause, times) -> None:
    """Repetitions of calling each of fns once, in turn; appends each call's seconds."""
    start = time.perf_counter()
    r = 0
    while True:
        elapsed = time.perf_counter() - start
        if r >= 3 and elapsed > max_time:
            break
        if r >= reps and elapsed >= min_time:
            break
        for name, fn in fns.items():
            if pause > 0:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn(*args)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        r += 1


# ----------------------------------------------------------------------------------------------
# Peak memory: one fwd+bwd call in a fresh process, VmHWM after the call minus VmRSS before it.


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _memory_child(impl: str, n: int, g: int, layout: str, dtype: str, d: int, device: str):
    y_true, y_pred, ids = make_inputs(n, g, layout, dtype, d)
    with tf.device(device.upper() + ":0"):
        args = [
            tf.constant(y_true, DTYPES[dtype]),
            tf.constant(y_pred, DTYPES[dtype]),
            tf.constant(ids),
        ]
        del y_true, y_pred, ids
        fn = build_fn(impl, "fwdbwd", g)
        # Trace without running: a warm-up call would leave its [G] temporaries in malloc's
        # free lists, and the measured call would then reuse them unseen.
        fn.get_concrete_function(*[tf.TensorSpec(a.shape, a.dtype) for a in args])
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        out = fn(*args)
        _first_value(out)
        peak = _status_kib("VmHWM")
    return {
        "impl": impl,
        "n": n,
        "g": g,
        "layout": layout,
        "dtype": dtype,
        "peak_extra_mib": (peak - before) / 1024,
        "output_mib": n * d * _itemsize(dtype) / 2**20,
    }


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].size


def peak_memory(impl, n, g, layout, dtype, d, device) -> dict | None:
    cmd = [
        sys.executable,
        "-m",
        "grouped_mae_op.bench",
        "--_memory-child",
        json.dumps([impl, n, g, layout, dtype, d, device]),
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as err:
        print(f"peak memory of {impl} failed: {err}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# Machine description, table, plot.


# Environment variables that change what is measured.
_ENV_VARS = (
    "TF_CPU_ALLOCATOR_USE_BFC",
    "GMAE_CPU_REUSE_BUFFERS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def machine() -> dict:
    cpu = platform.processor()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else cpu
    except OSError:
        pass
    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "grouped_mae_op": gm.__version__,
        "build_info": gm.build_info(),
        "git_commit": commit or None,
        "load_average": os.getloadavg(),
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt_ms(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_n(n):
    k = n.bit_length() - 1
    return f"2^{k}" if n == 1 << k else str(n)


def table(rows: list[dict]) -> str:
    """One line per configuration; time columns per implementation (median ms)."""
    head = (
        f"{'dev':4} {'dtype':8} {'mode':6} {'time':5} {'layout':7} {'N':>5} {'G':>7} | "
        f"{'fused':>8} {'reference':>9} {'composite':>9} {'seg_mean*':>9} {'floor':>7} "
        f"{'empty':>6} | {'vs ref':>7} {'vs comp':>7} {'x floor':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r["median_ms"]
        speed = r.get("speedup_vs_reference")
        speed_c = r.get("speedup_vs_composite")
        xfloor = r.get("fused_over_floor")
        lines.append(
            f"{r['device']:4} {r['dtype']:8} {r['mode']:6} {r.get('timing', 'call'):5} "
            f"{r['layout']:7} {_fmt_n(r['n']):>5} "
            f"{r['g']:>7} | {_fmt_ms(ms.get('fused')):>8} {_fmt_ms(ms.get('reference')):>9} "
            f"{_fmt_ms(ms.get('composite')):>9} "
            f"{_fmt_ms(ms.get('segment_mean')):>9} {_fmt_ms(ms.get('floor')):>7} "
            f"{_fmt_ms(ms.get('empty')):>6} | "
            f"{'-' if speed is None else f'{speed:.1f}x':>7} "
            f"{'-' if speed_c is None else f'{speed_c:.1f}x':>7} "
            f"{'-' if xfloor is None else f'{xfloor:.2f}':>7}"
        )
    lines.append(
        "Median ms. time = call: per call of a tf.function (includes TF's fixed cost per call, "
        "the 'empty' column); graph: per computation inside one tf.function that runs it many "
        "times (as inside a training step, where that cost is paid once per step); eager: per "
        "call without tf.function (eager ops and GradientTape, as with run_eagerly=True). "
        "vs ref = reference / fused; vs comp = composite / fused "
        "(composite: float32 unsorted_segment_sum, as users write it). "
        "x floor = fused / floor, where floor is "
        "one read of the inputs (12 B/row float32). *segment_mean: sorted ids only, and wrong "
        "when a group is empty."
    )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    all_rows = rows
    rows = [r for r in rows if r.get("timing", "call") == "call"]
    mode = "fwdbwd" if any(r["mode"] == "fwdbwd" for r in rows) else "fwd"
    sel = [r for r in rows if r["mode"] == mode]
    # Speedup over the composite users write, or over the reference if it was not timed.
    base = "composite" if any(r.get("speedup_vs_composite") for r in sel) else "reference"
    ns = sorted({r["n"] for r in sel})
    if len(ns) < 2:
        return False
    gs = sorted({r["g"] for r in sel})
    g_mid = gs[len(gs) // 2]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    dev, dtype = sel[0]["device"], sel[0]["dtype"]
    styles = {
        "fused": "o-",
        "reference": "s-",
        "composite": "D-",
        "segment_mean": "^--",
        "floor": "k:",
        "empty": "k-.",
    }
    for layout, alpha in (("sorted", 1.0), ("uniform", 0.55), ("zipf", 0.35)):
        cfg = [
            r
            for r in sel
            if r["g"] == g_mid
            and r["layout"] == layout
            and r["device"] == dev
            and r["dtype"] == dtype
        ]
        if not cfg:
            continue
        cfg.sort(key=lambda r: r["n"])
        for impl, style in styles.items():
            pts = [(r["n"], r["median_ms"][impl]) for r in cfg if r["median_ms"].get(impl)]
            if impl in ("floor", "empty") and layout != "sorted":
                continue
            if pts:
                label = impl if impl in ("floor", "empty") else f"{impl} ({layout})"
                if impl == "segment_mean":
                    label += ", wrong if a group is empty"
                ax1.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    style,
                    alpha=alpha,
                    label=label,
                    markersize=4,
                )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="N (rows)",
        ylabel="median ms per call",
        title=f"{mode}, G = {g_mid}, {dtype}, {dev}",
    )
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    for layout, style in (("sorted", "-"), ("uniform", "--"), ("zipf", ":")):
        for g in gs:
            cfg = sorted(
                (
                    r
                    for r in sel
                    if r["g"] == g and r["layout"] == layout and r.get(f"speedup_vs_{base}")
                ),
                key=lambda r: r["n"],
            )
            if cfg:
                ax2.plot(
                    [r["n"] for r in cfg],
                    [r[f"speedup_vs_{base}"] for r in cfg],
                    "o" + style,
                    markersize=3,
                    label=f"G={g} {layout}",
                )
    # The other timings at small N, as markers over every G and layout.
    for timing, marker, label in (("graph", "kx", "in graph"), ("eager", "k+", "eager, per call")):
        pts = [
            (r["n"], r[f"speedup_vs_{base}"])
            for r in all_rows
            if r.get("timing") == timing and r["mode"] == mode and r.get(f"speedup_vs_{base}")
        ]
        if pts:
            ax2.plot(
                [n for n, _ in pts],
                [v for _, v in pts],
                marker,
                markersize=6,
                label=f"{label} (all G, layouts)",
            )
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="N (rows)",
        ylabel=f"{base} time / fused time",
        title=f"speedup of fused over the {base} ({mode})",
    )
    ax2.legend(fontsize=6, ncol=2)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Command line.


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if "^" in part:
            base, exp = part.split("^")
            out.append(int(base) ** int(exp))
        elif "e" in part.lower():
            out.append(int(float(part)))
        else:
            out.append(int(part))
    return out


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return names

    return parse


def _check_ranges(parser, args) -> None:
    """parser.error (exit 2, naming the option and the value) for a number out of range."""
    at_least_one = [("--n", v) for v in args.n] + [("--g", v) for v in args.g]
    at_least_one += [("--reps", args.reps), ("--graph-iters", args.graph_iters)]
    at_least_one += [("--graph-copies", args.graph_copies), ("--d", args.d)]
    for name, value in at_least_one:
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    for name, value in [
        ("--min-time", args.min_time),
        ("--max-time", args.max_time),
        ("--pause-ms", args.pause_ms),
    ]:
        if not value >= 0:  # also NaN
            parser.error(f"{name} must be at least 0, got {value}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m grouped_mae_op.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prof = p.add_mutually_exclusive_group()
    prof.add_argument(
        "--quick",
        dest="profile",
        action="store_const",
        const="quick",
        help="the issue's targets: N 2^10, 2^20, 2^24; G 10, 1000, 1e5 (default)",
    )
    prof.add_argument(
        "--full",
        dest="profile",
        action="store_const",
        const="full",
        help="N 2^10..2^24, G 1..1e6, three layouts, three dtypes",
    )
    p.add_argument("--n", type=_ints, help="rows, e.g. 1024,2^20")
    p.add_argument("--g", type=_ints, help="num_groups, e.g. 10,1e5")
    p.add_argument("--layout", type=_names(LAYOUTS), help=f"any of {', '.join(LAYOUTS)}")
    p.add_argument("--dtype", type=_names(tuple(DTYPES)), help=f"any of {', '.join(DTYPES)}")
    p.add_argument(
        "--impl", type=_names(IMPLS), default=list(IMPLS), help=f"any of {', '.join(IMPLS)}"
    )
    p.add_argument(
        "--mode",
        type=_names(MODES),
        help="fwd, fwdbwd (default both; --quick times fwd only at N = 2^10 and 2^20)",
    )
    p.add_argument(
        "--device",
        type=_names(("cpu", "gpu")),
        help="cpu, gpu (default: cpu, and gpu when one is visible)",
    )
    p.add_argument("--d", type=int, default=1, help="elements per row (default 1)")
    p.add_argument(
        "--graph-n",
        type=_ints,
        help="N values also timed inside one tf.function (see --graph-iters), e.g. 2^10; "
        "0 for none (default: 2^10 for --quick, 2^10..2^14 for --full)",
    )
    p.add_argument(
        "--eager-n",
        type=_ints,
        help="N values also timed eagerly, without tf.function, e.g. 2^10; 0 for none "
        "(default: 2^10 for --quick, 2^10..2^14 for --full)",
    )
    p.add_argument(
        "--graph-iters",
        type=int,
        default=100,
        metavar="K",
        help="in-graph timing: a tf.while_loop of K iterations (default 100) ...",
    )
    p.add_argument(
        "--graph-copies",
        type=int,
        default=4,
        metavar="U",
        help="... each computing on U copies of the inputs (default 4); the time per call / "
        "(K * U) is the cost inside a training step, without TF's fixed cost per call",
    )
    p.add_argument(
        "--order",
        choices=("round-robin", "back-to-back"),
        default="round-robin",
        help="round-robin (default): each repetition calls every implementation once, in turn; "
        "back-to-back: all calls of one implementation, then the next (warm caches)",
    )
    p.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="sleep this long before each timed call (default 0), to time calls that start "
        "after an idle period",
    )
    p.add_argument("--reps", type=int, help="timed repetitions per configuration")
    p.add_argument("--min-time", type=float, help="keep repeating for at least this many s")
    p.add_argument(
        "--max-time",
        type=float,
        default=8.0,
        help="stop after 3 repetitions once a configuration has run this many s (default 8)",
    )
    p.add_argument(
        "--memory",
        dest="memory",
        action="store_true",
        default=True,
        help="measure peak extra memory of one fwd+bwd call (default on)",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false", default=True)
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    prof = PROFILES[args.profile or "quick"]
    grid_given = args.n is not None or args.mode is not None
    for key in ("n", "g", "layout", "dtype", "reps", "min_time", "graph_n", "eager_n"):
        if getattr(args, key) is None:
            setattr(args, key, prof[key])
    _check_ranges(p, args)
    args.graph_n = [n for n in args.graph_n if n > 0]
    args.eager_n = [n for n in args.eager_n if n > 0]
    # The forward alone is timed at every N of a grid given with --n or --mode, else per the
    # profile.
    args.fwd_n = None if grid_given else prof["fwd_n"]
    if args.mode is None:
        args.mode = list(MODES)
    if args.device is None:
        args.device = ["cpu"] + (["gpu"] if tf.config.list_physical_devices("GPU") else [])
    return args


def _plan(args, n: int) -> list[tuple[str, str]]:
    """(mode, timing) pairs to run at N = n."""
    modes = [m for m in args.mode if m != "fwd" or args.fwd_n is None or n in args.fwd_n]
    timings = ["call"] + (["graph"] if n in args.graph_n else [])
    timings += ["eager"] if n in args.eager_n else []
    return [(m, t) for m in modes for t in timings]


def run(args) -> dict:
    from tqdm import tqdm

    configs = [
        (dev, dt, lay, n, g)
        for dev in args.device
        for dt in args.dtype
        for lay in args.layout
        for n in args.n
        for g in args.g
    ]
    desc = machine()
    rows = []
    total = sum(len(_plan(args, c[3])) for c in configs)
    bar = tqdm(total=total, unit="cfg", file=sys.stderr, dynamic_ncols=True)
    for dev, dt, lay, n, g in configs:
        y_true, y_pred, ids = make_inputs(n, g, lay, dt, args.d)
        with tf.device(dev.upper() + ":0"):
            inputs = (
                tf.constant(y_true, DTYPES[dt]),
                tf.constant(y_pred, DTYPES[dt]),
                tf.constant(ids),
            )
        del y_true, y_pred, ids
        for mode, timing in _plan(args, n):
            bar.set_description(f"{dev} {dt} {mode} {lay} N={_fmt_n(n)} G={g} {timing}")
            impls = [i for i in args.impl if applicable(i, lay)]
            iters = args.graph_iters if timing == "graph" else 0
            per = args.graph_iters * args.graph_copies if timing == "graph" else 1
            with tf.device(dev.upper() + ":0"):
                if timing == "eager":
                    fns = {i: _body(i, mode, g) for i in impls}
                else:
                    fns = {i: build_fn(i, mode, g, iters) for i in impls}
                fn_args = graph_inputs(inputs, args.graph_copies) if iters else inputs
                times, values = time_side_by_side(
                    fns,
                    fn_args,
                    dev,
                    args.reps,
                    args.min_time,
                    args.max_time,
                    order=args.order,
                    pause=args.pause_ms / 1e3,
                )
            times = {i: [x / per for x in t] for i, t in times.items()}
            med = {i: 1e3 * statistics.median(t) for i, t in times.items()}
            row = {
                "device": dev,
                "dtype": dt,
                "mode": mode,
                "timing": timing,
                "layout": lay,
                "n": n,
                "g": g,
                "d": args.d,
                "median_ms": med,
                "times_ms": {i: [1e3 * x for x in t] for i, t in times.items()},
            }
            if timing == "graph":
                row["graph"] = {"iterations": args.graph_iters, "copies": args.graph_copies}
            else:
                row["loss"] = {i: v for i, v in values.items() if i not in ("floor", "empty")}
            if "fused" in med and "reference" in med:
                row["speedup_vs_reference"] = med["reference"] / med["fused"]
                if timing in ("call", "eager"):
                    ref, got = values["reference"], values["fused"]
                    row["fused_matches_reference"] = abs(got - ref) <= 1e-4 * max(1.0, abs(ref))
            if "fused" in med and "composite" in med:
                row["speedup_vs_composite"] = med["composite"] / med["fused"]
            if "fused" in med and "floor" in med:
                row["fused_over_floor"] = med["fused"] / med["floor"]
            rows.append(row)
            bar.update()
        del inputs
    bar.close()
    result = {
        "machine": desc,
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "memory_child"
        },
        "rows": rows,
    }
    if args.memory and "fwdbwd" in args.mode:
        n, g = max(args.n), max(args.g)
        lay = "sorted" if "sorted" in args.layout else args.layout[0]
        impls = [i for i in args.impl if applicable(i, lay) and i not in ("floor", "empty")]
        print(f"peak memory, fwdbwd N={_fmt_n(n)} G={g}: {len(impls)} processes", file=sys.stderr)
        # Memory, not time: two processes at once are measured as well as one.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            mem = pool.map(
                lambda i: peak_memory(i, n, g, lay, args.dtype[0], args.d, args.device[0]), impls
            )
            result["peak_memory"] = [m for m in mem if m]
    result["machine"]["load_average_end"] = os.getloadavg()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # one tf.function per configuration: no retrace warnings
    if args.memory_child:
        print(json.dumps(_memory_child(*json.loads(args.memory_child))))
        return 0
    result = run(args)
    print(table(result["rows"]))
    if args.order != "round-robin" or args.pause_ms > 0:
        print(f"Timed {args.order}, with a pause of {args.pause_ms:g} ms before each call.")
    for m in result.get("peak_memory", []):
        print(
            f"peak extra memory, one fwd+bwd call, {m['dtype']} N={_fmt_n(m['n'])} "
            f"G={m['g']} {m['layout']}: {m['impl']:<13} {m['peak_extra_mib']:8.1f} MiB "
            f"(of which the gradient output {m['output_mib']:.0f} MiB)"
        )
    bad = [r for r in result["rows"] if r.get("fused_matches_reference") is False]
    for r in bad:
        print(
            f"WARNING: fused {r['loss']['fused']} != reference {r['loss']['reference']} "
            f"at {r['mode']} {r['layout']} N={r['n']} G={r['g']}"
        )
    m = result["machine"]
    print(
        f"{m['cpu_model']}, {m['cpus_usable']} CPUs, TF {m['tensorflow']}, load average "
        f"{m['load_average'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    written = [args.out / "results.json"]
    if args.plot and plot(result["rows"], args.out / "results.png"):
        written.append(args.out / "results.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
