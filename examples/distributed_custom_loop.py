"""Multi-worker training with the grouped loss: MultiWorkerMirroredStrategy + a custom loop.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
each worker runs `strategy.run` on a GradientTape step. The loss all-reduces its per-group
sums and weights, so every worker trains on the grouped MAE of the *global* batch even
though it only holds its own rows (here the two shards even have different sizes).

Run two workers on this machine (loopback only):

    python examples/distributed_custom_loop.py --launch 2

or start each worker yourself, on each node, with the same --hosts list:

    python examples/distributed_custom_loop.py --hosts host0:12345,host1:12345 --index 0
    python examples/distributed_custom_loop.py --hosts host0:12345,host1:12345 --index 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

NUM_GROUPS = 8
FEATURES = 4


def worker(hosts: list[str], index: int, steps: int, lr: float, out: str | None) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from grouped_mae_op.loss import GroupedMeanAbsoluteError, pack_targets

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING,
            timeout_seconds=60.0,
        )
    )

    # Every worker builds the same global data here for the demo; a real job reads only
    # its own shard. The shards have different sizes on purpose.
    rng = np.random.default_rng(0)
    n = 96
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    ids = rng.zipf(1.6, size=n).clip(max=NUM_GROUPS) - 1
    y = (x @ rng.normal(size=FEATURES) + 0.5 * ids).astype(np.float32)
    sw = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    bounds = np.linspace(0, n, len(hosts) + 1).astype(int)
    bounds[1:-1] += 10  # unequal shards
    rows = slice(bounds[index], bounds[index + 1])
    x_local = tf.constant(x[rows])
    y_local = tf.constant(pack_targets(y[rows], ids[rows]))
    sw_local = tf.constant(sw[rows])

    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(
                    16, "relu", kernel_initializer=keras.initializers.GlorotUniform(1)
                ),
                keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(2)),
            ]
        )
        optimizer = keras.optimizers.SGD(lr)
        loss_fn = GroupedMeanAbsoluteError(num_groups=NUM_GROUPS)
    initial = [w.numpy().tolist() for w in model.trainable_weights]

    @tf.function
    def train_step(x, y_true, sample_weight):
        def step(x, y_true, sample_weight):
            with tf.GradientTape() as tape:
                # Each replica's loss is 1/num_replicas of the global grouped MAE.
                loss = loss_fn(y_true, model(x, training=True), sample_weight=sample_weight)
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply_gradients(
                zip(grads, model.trainable_weights, strict=True)
            )  # sums replicas
            return loss

        per_replica = strategy.run(step, args=(x, y_true, sample_weight))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    losses = []
    for i in range(steps):
        losses.append(float(train_step(x_local, y_local, sw_local)))
        if index == 0 and (i % 10 == 0 or i == steps - 1):
            print(f"step {i:3d}  global grouped MAE {losses[-1]:.4f}", flush=True)
    if out:
        result = {
            "index": index,
            "rows": [int(bounds[index]), int(bounds[index + 1])],
            "initial": initial,
            "final": [w.numpy().tolist() for w in model.trainable_weights],
            "losses": losses,
        }
        with open(out, "w") as f:
            json.dump(result, f)


def free_ports(count: int) -> list[int]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(count: int, steps: int, lr: float, out_dir: str | None, timeout: float) -> int:
    """Start `count` workers on 127.0.0.1 and wait for them, killing all after `timeout`."""
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(count))
    procs = []
    for i in range(count):
        cmd = [sys.executable, __file__, "--hosts", hosts, "--index", str(i)]
        cmd += ["--steps", str(steps), "--lr", str(lr)]
        if out_dir:
            cmd += ["--out", os.path.join(out_dir, f"worker{i}.json")]
        procs.append(subprocess.Popen(cmd))
    deadline = time.monotonic() + timeout
    codes = [None] * count
    while None in codes and time.monotonic() < deadline:
        time.sleep(0.2)
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            break
    status = 0
    for p in procs:
        if p.poll() is None:
            p.kill()
            status = 124
        p.wait()
        status = status or p.returncode
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", type=int, help="start this many local workers")
    parser.add_argument("--hosts", help="comma-separated host:port of every worker")
    parser.add_argument("--index", type=int, default=0, help="this worker's index in --hosts")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", help="JSON result file (worker) or folder (--launch)")
    parser.add_argument("--timeout", type=float, default=300.0, help="--launch: seconds")
    args = parser.parse_args()
    if args.launch:
        return launch(args.launch, args.steps, args.lr, args.out, args.timeout)
    if not args.hosts:
        parser.error("give --launch N, or --hosts and --index")
    worker(args.hosts.split(","), args.index, args.steps, args.lr, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
