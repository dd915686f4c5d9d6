"""GPU tests of the TF-free core module (grouped_mae_op._core) with CuPy or PyTorch arrays.

They load the compiled module straight from its file, without importing grouped_mae_op (which
imports TensorFlow), so they run on a machine without TF:
    GMAE_CORE_DIR=<dir holding _core*.so> pytest --confcutdir=tests/gpu tests/gpu
(--confcutdir keeps tests/conftest.py, which imports TensorFlow, out.) Everything here skips
when the module was built without CUDA, when neither CuPy nor PyTorch is installed, or when no
GPU is visible.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_bench import load_core  # noqa: E402  (the one loader of the TF-free core module)


class TorchArrays:
    """Device arrays as PyTorch CUDA tensors (supports bfloat16 through an int16 view)."""

    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.types = {
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
            "float64": torch.float64,
            "int32": torch.int32,
            "int64": torch.int64,
        }

    def device(self, host, dtype):
        host = np.ascontiguousarray(host, dtype=np.float64 if "float" in dtype else None)
        return self.torch.from_numpy(host).to(device="cuda", dtype=self.types[dtype]).contiguous()

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=self.types[dtype], device="cuda")

    def arg(self, x):
        return x.view(self.torch.int16) if x.dtype == self.torch.bfloat16 else x

    def host(self, x):
        self.torch.cuda.synchronize()
        return x.detach().to(dtype=self.torch.float64).cpu().numpy()

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def sync(self):
        self.torch.cuda.synchronize()


class CupyArrays:
    """Device arrays as CuPy arrays (no bfloat16)."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy

    def device(self, host, dtype):
        return self.cp.asarray(np.asarray(host).astype(dtype))

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=dtype)

    def arg(self, x):
        return x

    def host(self, x):
        self.cp.cuda.Device().synchronize()
        return self.cp.asnumpy(x).astype(np.float64)

    def stream(self):
        return self.cp.cuda.get_current_stream().ptr

    def sync(self):
        self.cp.cuda.Device().synchronize()


def make_backend():
    for cls in (TorchArrays, CupyArrays):
        try:
            return cls()
        except ImportError:
            continue
    return None


def unavailable(reason):
    """Skip, or fail when GMAE_REQUIRE_GPU=1 (scripts/gpu_check.sh: a GPU run must not pass
    by skipping everything)."""
    if os.environ.get("GMAE_REQUIRE_GPU") == "1":
        pytest.fail(f"GMAE_REQUIRE_GPU=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def core():
    module = load_core()
    if module is None:
        unavailable("the core module _core*.so was not found (build it; set GMAE_CORE_DIR)")
    if not getattr(module, "with_cuda", False):
        unavailable("the core module was built without CUDA")
    if module.cuda_device_count() == 0:
        unavailable("no CUDA device visible")
    return module


@pytest.fixture(scope="session")
def xp(core):
    backend = make_backend()
    if backend is None:
        unavailable("neither PyTorch nor CuPy is installed")
    return backend
