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
# --- hypothesis profiles -----------------------------------------------------------------
# "ci" (default): fixed examples (derandomized), no per-example deadline (the machine is
# shared; timing is not under test). "fuzz" (`make fuzz`): 20x the examples, random seeds.
# Pick one with `pytest --hypothesis-profile=fuzz`.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK
)
settings.register_profile(
    "fuzz", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK, print_blob=True
)
settings.load_profile("ci")


# --- make sanitize ------------------------------------------------------------------------
# The sanitized build is imported through PYTHONPATH; fail fast if the normal one was.
if os.environ.get("GMAE_EXPECT_SANITIZE"):
    import grouped_mae_op  # noqa: E402

    if not grouped_mae_op.build_info().get("sanitize"):
        raise RuntimeError(f"expected the sanitized build, imported {grouped_mae_op.__file__}")
