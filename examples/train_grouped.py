"""What the grouped loss buys: 100 series with Zipf-distributed sizes, three losses.

The same small model is trained three times on the same data:
  plain    keras MeanAbsoluteError: every row counts the same, so the few big series dominate;
  grouped  GroupedMeanAbsoluteError: every series counts the same, however few rows it has;
  worst    GroupedMeanAbsoluteError(group_reduction="softmax"): leans on the worst series.
It prints each model's error on held-out rows (the same number of rows per series), split
into small and large series, and saves a plot of per-series error against series size.

    python examples/train_grouped.py            # or: make example
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from grouped_mae_op.loss import GroupedMeanAbsoluteError, pack_targets  # noqa: E402
from grouped_mae_op.metrics import GroupedMeanAbsoluteError as GroupedMetric  # noqa: E402

NUM_SERIES = 100
FEATURES = 4
HERE = pathlib.Path(__file__).resolve().parent


def make_data(seed: int, total_rows: int):
    """Series g has ~ 1/(g+1)^1.2 of the rows; each series has its own target function."""
    rng = np.random.default_rng(seed)
    share = 1.0 / np.arange(1, NUM_SERIES + 1) ** 1.2
    sizes = np.maximum(4, np.round(total_rows * share / share.sum())).astype(int)
    # Series share a trend but each bends it its own way; the big series also sit at a
    # different level from the many small ones (as big and small stores often do).
    common = rng.normal(size=FEATURES)
    directions = common + rng.normal(scale=0.5, size=(NUM_SERIES, FEATURES))
    log_size = np.log(sizes)
    offsets = (log_size - log_size.mean()) / log_size.std() + rng.normal(scale=0.3, size=NUM_SERIES)

    def rows(counts):
        ids = np.repeat(np.arange(NUM_SERIES), counts)
        x = rng.normal(size=(len(ids), FEATURES)).astype(np.float32)
        signal = np.sin(np.sum(x * directions[ids], axis=1)) + offsets[ids]
        y = signal + rng.laplace(scale=0.1, size=len(ids))
        return x, ids.astype(np.int32), y.astype(np.float32)

    train = rows(sizes)
    test = rows(np.full(NUM_SERIES, 40))  # equal rows per series: each series' error
    return sizes, train, test


def make_model(seed: int) -> keras.Model:
    # The model sees the features only, not the series: one function must serve all
    # series, so the loss decides which series it fits best.
    x_in = keras.Input((FEATURES,), name="x")
    init = keras.initializers.GlorotUniform(seed=seed)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init)(x_in)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init)(h)
    out = keras.layers.Dense(1, kernel_initializer=init)(h)
    return keras.Model(x_in, out)


def train(name, loss, train_data, test_data, epochs, batch_size, seed):
    x, ids, y = train_data
    model = make_model(seed)
    plain = name == "plain"
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=loss,
        metrics=[] if plain else [GroupedMetric(NUM_SERIES, name="grouped_mae_metric")],
    )
    y_fit = y[:, None] if plain else pack_targets(y, ids)
    start = time.perf_counter()
    model.fit(x, y_fit, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start

    tx, tids, ty = test_data
    metric = GroupedMetric(NUM_SERIES)
    pred = model.predict(tx, batch_size=4096, verbose=0)
    metric.update_state(pack_targets(ty, tids), pred)
    return metric.group_results().numpy(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="training rows in all")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "output"), help="folder for the plot")
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    tf.config.threading.set_inter_op_parallelism_threads(2)

    sizes, train_data, test_data = make_data(args.seed, args.rows)
    print(
        f"{NUM_SERIES} series, {len(train_data[1])} training rows; series sizes from "
        f"{sizes.max()} down to {sizes.min()} (median {int(np.median(sizes))})"
    )
    runs = {
        "plain": keras.losses.MeanAbsoluteError(),
        "grouped": GroupedMeanAbsoluteError(num_groups=NUM_SERIES),
        "worst": GroupedMeanAbsoluteError(
            num_groups=NUM_SERIES, group_reduction="softmax", temperature=args.temperature
        ),
    }
    results = {}
    for name, loss in runs.items():
        results[name], seconds = train(
            name, loss, train_data, test_data, args.epochs, args.batch_size, args.seed
        )
        print(f"  trained {name:<8} in {seconds:5.1f} s")

    order = np.argsort(-sizes)
    large, small = order[:10], order[50:]
    row_share = sizes / sizes.sum()
    print()
    print("held-out MAE          plain  grouped    worst")
    lines = [
        ("per row (train mix)", lambda e: np.sum(row_share * e)),
        ("per series (mean)", np.mean),
        ("10 largest series", lambda e: np.mean(e[large])),
        ("50 smallest series", lambda e: np.mean(e[small])),
        ("worst series", np.max),
    ]
    for label, fn in lines:
        values = "".join(f"{fn(results[n]):9.3f}" for n in runs)
        print(f"{label:<20}{values}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    styles = {
        "plain": ("tab:gray", "o", "plain MAE"),
        "grouped": ("tab:blue", "s", "grouped MAE"),
        "worst": ("tab:red", "^", f"grouped, softmax worst-group (T={args.temperature})"),
    }
    for name in runs:
        color, marker, label = styles[name]
        ax.scatter(sizes, results[name], s=12, color=color, marker=marker, label=label, alpha=0.75)
    ax.set_xscale("log")
    ax.set_xlabel("series size (training rows)")
    ax.set_ylabel("held-out MAE of the series")
    ax.set_title("Per-series error: plain MAE vs grouped MAE")
    ax.legend()
    fig.tight_layout()
    path = out / "grouped_vs_plain.png"
    fig.savefig(path)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
