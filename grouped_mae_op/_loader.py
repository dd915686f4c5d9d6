"""Finds and loads the compiled op library that sits next to this package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tensorflow as tf

_HERE = Path(__file__).resolve().parent
_REBUILD = (
    "Rebuild it from the source tree with `make build` "
    "(or `pip install --no-build-isolation -e .` in an environment with TensorFlow installed)."
)


def _libraries() -> list[Path]:
    return sorted(_HERE.glob("_grouped_mae_ops*.so"), key=lambda p: p.stat().st_mtime)


def build_info() -> dict:
    """Facts embedded at build time: TF version, CUDA on/off and architectures, XLA."""
    libs = _libraries()
    if not libs:
        return {}
    match = re.search(rb"GMAE_BUILD_INFO(\{[^\x00]*\})", libs[-1].read_bytes())
    return json.loads(match.group(1)) if match else {}


def load_library():
    libs = _libraries()
    if not libs:
        raise ImportError(
            f"grouped_mae_op: the compiled op library (_grouped_mae_ops*.so) is missing from "
            f"{_HERE}. {_REBUILD}"
        )
    built_for = build_info().get("tf_version")
    if built_for and built_for != tf.__version__:
        raise ImportError(
            f"grouped_mae_op: {libs[-1].name} was built against TensorFlow {built_for}, but "
            f"TensorFlow {tf.__version__} is imported. {_REBUILD}"
        )
    try:
        return tf.load_op_library(str(libs[-1]))
    except (tf.errors.NotFoundError, OSError) as err:
        raise ImportError(
            f"grouped_mae_op: {libs[-1]} failed to load into TensorFlow {tf.__version__} "
            f"({err}). It was probably built against another TensorFlow. {_REBUILD}"
        ) from err


ops = load_library()
