"""GPU microbenchmark of the grouped-MAE CUDA kernels through the TF-free core module, side by
side with PyTorch (index_add_) and JAX (jax.ops.segment_sum) versions on the same inputs.

Per configuration (N, G, id layout, dtype): forward and forward+backward times (median of CUDA
event timings), achieved forward bandwidth as a fraction of a device-to-device copy measured
in the same run, the deterministic forward's time relative to the atomic one, and the
PyTorch / JAX times. Prints a table and writes JSON. Nothing is asserted: the targets
(forward >= 75% of copy bandwidth at N >= 16M; fwd+bwd >= 3x PyTorch and not slower than JAX;
deterministic <= 1.5x) are printed as ratios for a person to judge.

    python scripts/gpu_bench.py --core-dir build/core --json results.json [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch


def load_core(core_dir: str | None = None):
    """The TF-free _core extension from core_dir, $GMAE_CORE_DIR or grouped_mae_op/, or None.
    Loaded from its file, so that grouped_mae_op (which imports TensorFlow) is not imported.
    tests/gpu/conftest.py loads the module through this function too."""
    root = Path(__file__).resolve().parents[1]
    candidates = [core_dir, os.environ.get("GMAE_CORE_DIR"), str(root / "grouped_mae_op")]
    for d in filter(None, candidates):
        found = sorted(Path(d).glob("_core*.so"))
        if found:
            spec = importlib.util.spec_from_file_location("_core", found[-1])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


def cuda_time(torch, fn, reps: int) -> float:
    """Median milliseconds of fn() over reps, by CUDA events, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_time(fn, reps: int) -> float:
    """Median milliseconds for functions that block (JAX's block_until_ready)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(torch, nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time(torch, lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def torch_version(torch, yt, yp, ids, g, acc_dtype):
    """The grouped MAE in plain PyTorch: index_add_ sums and counts, mean over present groups."""
    idx = ids.long()

    def loss_fn(pred):
        e = (pred - yt).abs().to(acc_dtype)
        s = torch.zeros(g, dtype=acc_dtype, device=pred.device).index_add_(0, idx, e)
        w = torch.zeros(g, dtype=acc_dtype, device=pred.device).index_add_(
            0, idx, torch.ones_like(e)
        )
        present = w > 0
        return (s[present] / w[present]).mean()

    def fwd():
        with torch.no_grad():
            return loss_fn(yp)

    pred = yp.clone().requires_grad_(True)

    def fwd_bwd():
        pred.grad = None
        loss_fn(pred).backward()

    return fwd, fwd_bwd


def jax_version(jax, jnp, yt_np, yp_np, ids_np, g):
    yt, yp, ids = jnp.asarray(yt_np), jnp.asarray(yp_np), jnp.asarray(ids_np)

    def loss_fn(pred):
        e = jnp.abs(pred - yt).astype(jnp.float32)
        s = jax.ops.segment_sum(e, ids, num_segments=g)
        w = jax.ops.segment_sum(jnp.ones_like(e), ids, num_segments=g)
        present = w > 0
        per_group = jnp.where(present, s / jnp.where(present, w, 1), 0)
        return per_group.sum() / present.sum()

    fwd = jax.jit(loss_fn)
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    return (lambda: fwd(yp).block_until_ready()), (lambda: jax.block_until_ready(fwd_bwd(yp)))


def bench_config(core, torch, jax, jnp, args, gen, copy_gbs, n, g, layout, dtype) -> dict:
    """Times ours (atomic and deterministic), PyTorch and JAX on one input configuration."""
    tdtype = getattr(torch, dtype)
    yt = torch.randn(n, device="cuda", generator=gen).to(tdtype)
    yp = torch.randn(n, device="cuda", generator=gen).to(tdtype)
    ids = torch.randint(0, g, (n,), device="cuda", generator=gen, dtype=torch.int32)
    if layout == "sorted":
        ids = torch.sort(ids).values.contiguous()
    loss = torch.empty(1, dtype=tdtype, device="cuda")
    scale = torch.empty(g, dtype=torch.float32, device="cuda")
    upstream = torch.ones(1, dtype=tdtype, device="cuda")
    grad = torch.empty_like(yp)

    def stream():
        return torch.cuda.current_stream().cuda_stream

    def fwd(det=False):
        return core.cuda_loss(yt, yp, ids, loss, scale, deterministic=det, stream=stream())

    def fwd_bwd():
        fwd()
        core.cuda_backward(yt, yp, ids, scale, upstream, grad, stream=stream())

    plan = fwd()
    t_fwd = cuda_time(torch, fwd, args.reps)
    t_fb = cuda_time(torch, fwd_bwd, args.reps)
    t_det = cuda_time(torch, lambda: fwd(True), args.reps)
    fwd_gbs = n * (2 * yt.element_size() + ids.element_size()) / (t_fwd * 1e-3) / 1e9
    row = {
        "n": n,
        "groups": g,
        "layout": layout,
        "dtype": dtype,
        "strategy": plan["strategy"],
        "vectorized": plan["vectorized"],
        "fwd_ms": t_fwd,
        "fwd_bwd_ms": t_fb,
        "det_fwd_ms": t_det,
        "fwd_gbs": fwd_gbs,
        "fwd_frac_of_copy": fwd_gbs / copy_gbs,
        "det_over_atomic": t_det / t_fwd,
    }
    if not args.no_torch_baseline:
        tf_, tfb = torch_version(torch, yt, yp, ids, g, torch.float32)
        row["torch_fwd_ms"] = cuda_time(torch, tf_, args.reps)
        row["torch_fwd_bwd_ms"] = cuda_time(torch, tfb, args.reps)
        row["torch_over_ours_fwd_bwd"] = row["torch_fwd_bwd_ms"] / t_fb
    if jax is not None:
        jf, jfb = jax_version(jax, jnp, *[t.cpu().numpy() for t in (yt, yp, ids)], g)
        row["jax_fwd_ms"] = wall_time(jf, args.reps)
        row["jax_fwd_bwd_ms"] = wall_time(jfb, args.reps)
        row["jax_over_ours_fwd_bwd"] = row["jax_fwd_bwd_ms"] / t_fb
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--core-dir", help="directory holding _core*.so")
    ap.add_argument("--json", default="gpu_bench.json", help="where to write the results")
    ap.add_argument("--quick", action="store_true", help="N = 1M, two configurations")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--no-torch-baseline", action="store_true")
    args = ap.parse_args()

    import torch

    core = load_core(args.core_dir)
    if core is None:
        sys.exit("core module _core*.so not found: build it and pass --core-dir")
    if not core.with_cuda or core.cuda_device_count() == 0:
        sys.exit("needs the CUDA core module and a GPU")
    jax = jnp = None
    if not args.no_jax:
        try:
            import jax
            import jax.numpy as jnp
        except ImportError:
            print("JAX not installed: no JAX column")

    if args.quick:
        configs = [(1 << 20, 100, "random", "float32"), (1 << 20, 10_000, "sorted", "float32")]
    else:
        configs = [
            (1 << 24, g, layout, "float32")
            for g in (1, 100, 10_000, 1_000_000)
            for layout in ("sorted", "random")
        ] + [(1 << 24, g, "random", "float16") for g in (100, 1_000_000)]
        configs += [(1 << 26, 1_000_000, "random", "float32")]

    dev_name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth(torch, 1 << 30, args.reps)
    print(f"device: {dev_name}; device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, g, layout, dtype in configs:
        rows.append(bench_config(core, torch, jax, jnp, args, gen, copy_gbs, n, g, layout, dtype))
        print_row(rows[-1], header=len(rows) == 1)
        torch.cuda.empty_cache()

    result = {
        "device": dev_name,
        "copy_gbs": copy_gbs,
        "reps": args.reps,
        "rows": rows,
        "targets": {
            "fwd_frac_of_copy": ">= 0.75 at N >= 16M",
            "torch_over_ours_fwd_bwd": ">= 3",
            "jax_over_ours_fwd_bwd": ">= 1",
            "det_over_atomic": "<= 1.5",
        },
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


COLUMNS = [  # header, key, width, format
    ("N", "n", 9, "{}"),
    ("G", "groups", 8, "{}"),
    ("ids", "layout", 7, "{}"),
    ("dtype", "dtype", 8, "{}"),
    ("strategy", "strategy", 13, "{}"),
    ("fwd ms", "fwd_ms", 8, "{:.3f}"),
    ("%copy", "fwd_frac_of_copy", 6, "{:.0%}"),
    ("f+b ms", "fwd_bwd_ms", 8, "{:.3f}"),
    ("det/atom", "det_over_atomic", 8, "{:.2f}"),
    ("torch f+b", "torch_fwd_bwd_ms", 9, "{:.3f}"),
    ("x torch", "torch_over_ours_fwd_bwd", 7, "{:.1f}"),
    ("jax f+b", "jax_fwd_bwd_ms", 8, "{:.3f}"),
    ("x jax", "jax_over_ours_fwd_bwd", 6, "{:.2f}"),
]


def print_row(r, header):
    if header:
        print(" ".join(f"{name:>{w}}" for name, _, w, _ in COLUMNS))
    cells = (fmt.format(r[key]) if key in r else "-" for _, key, _, fmt in COLUMNS)
    print(" ".join(f"{c:>{w}}" for c, (_, _, w, _) in zip(cells, COLUMNS, strict=True)), flush=True)


if __name__ == "__main__":
    main()
