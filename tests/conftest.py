import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no GPU visible to TensorFlow")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


# --- tf.distribute tests (tests/test_distribute.py) ---------------------------------------
# Two logical CPU devices, so that MirroredStrategy has two replicas on a CPU-only machine.
# This must run before TensorFlow initializes its devices, hence here at conftest import.
def _two_logical_cpus():
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # devices already initialized; test_distribute checks the count
        pass


_two_logical_cpus()
