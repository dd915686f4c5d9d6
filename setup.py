"""setuptools front end: runs CMake (CMakeLists.txt) against the installed TensorFlow.

Build with the TensorFlow you will run with, without build isolation:
    pip install --no-build-isolation -e .
Environment: GMAE_CUDA=ON|OFF|AUTO (default AUTO: on when nvcc is found),
GMAE_CUDA_ARCHITECTURES (CMake list, e.g. "75;80;86;89;90;90-virtual"), GMAE_XLA=ON|OFF,
GMAE_SANITIZE=ON|OFF, GMAE_CPU_NATIVE=ON|OFF (-march=native), GMAE_CPU_AVX=ON|OFF (-mavx -mpopcnt
on x86-64, default ON), GMAE_BUILD_DIR (default build/),
CMAKE_BUILD_PARALLEL_LEVEL.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if ext.name == "grouped_mae_op._core":
            return  # the TF-free core module: built by the same CMake run, next to the op library
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = target.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(os.environ.get("GMAE_BUILD_DIR", ROOT / "build")).resolve()
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DGMAE_OUTPUT_DIR={out_dir}",
            f"-DGMAE_CUDA={os.environ.get('GMAE_CUDA', 'AUTO')}",
            f"-DGMAE_XLA={os.environ.get('GMAE_XLA', 'ON')}",
            f"-DGMAE_SANITIZE={os.environ.get('GMAE_SANITIZE', 'OFF')}",
            f"-DGMAE_CPU_NATIVE={os.environ.get('GMAE_CPU_NATIVE', 'OFF')}",
            f"-DGMAE_CPU_AVX={os.environ.get('GMAE_CPU_AVX', 'ON')}",
        ]
        if os.environ.get("GMAE_CUDA_ARCHITECTURES"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['GMAE_CUDA_ARCHITECTURES']}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        # CMake writes _grouped_mae_ops.so; setuptools expects the extension's file name.
        built = out_dir / "_grouped_mae_ops.so"
        if built != target:
            shutil.copy2(built, target)
            built.unlink()


setup(
    ext_modules=[
        CMakeExtension("grouped_mae_op._grouped_mae_ops"),
        CMakeExtension("grouped_mae_op._core"),  # must come after the op library
    ],
    cmdclass={"build_ext": CMakeBuild},
)
