"""Builds dip_kernels._C from csrc/: CUDA sources when nvcc and a CUDA build of torch are present,
a CPU-only module otherwise. The module uses only the LibTorch stable ABI and Python's limited API,
so one build (an abi3 wheel) loads in every torch from TORCH_TARGET_VERSION on. Environment:
  DIP_KERNELS_BUILD_CUDA=0   skip the CUDA sources
  TORCH_CUDA_ARCH_LIST       architectures (default "8.0;9.0a;10.0a": A100, H100/H200, B200)
  MAX_JOBS                   parallel compile jobs (ninja)
  CUDA_HOME                  the CUDA toolkit; derived from nvcc's real location when unset
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup


def _derive_cuda_home():
    # `nvcc` on PATH may be a wrapper script, so the toolkit is where nvcc says it runs from.
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ _HERE_=(.*)/bin\s*$", out.stderr + out.stdout, re.M)
    return m.group(1) if m else None


if not os.environ.get("CUDA_HOME") and os.environ.get("DIP_KERNELS_BUILD_CUDA", "1") != "0":
    home = _derive_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest torch the binary loads in: the stable-ABI headers hide every API newer than this.
TORCH_TARGET_VERSION = (2, 10)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a;10.0a"


def stable_abi_macros():
    """The defines every translation unit is compiled with (CMakeLists.txt reads them from here):
    TORCH_STABLE_ONLY makes an ATen, c10 or torch/library.h include a compile error. Py_LIMITED_API
    comes from torch's BuildExtension (py_limited_api=True)."""
    major, minor = TORCH_TARGET_VERSION
    return [("TORCH_STABLE_ONLY", None), ("TORCH_TARGET_VERSION", f"0x{major:02x}{minor:02x}000000000000")]


def _relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    cpp_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    cuda_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    build_cuda = (os.environ.get("DIP_KERNELS_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
                  and CUDA_HOME is not None and bool(cuda_sources))
    cxx = ["-O3"]  # the C++ standard comes from torch (C++17 or C++20 by version)
    if not build_cuda:
        reason = ("DIP_KERNELS_BUILD_CUDA=0" if os.environ.get("DIP_KERNELS_BUILD_CUDA") == "0"
                  else "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc/CUDA_HOME)")
        print(f"dip-kernels: building dip_kernels._C without CUDA ({reason})")
        return [CppExtension("dip_kernels._C", cpp_sources, define_macros=stable_abi_macros(),
                             extra_compile_args={"cxx": cxx}, py_limited_api=True)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    print(f"dip-kernels: building CUDA kernels with {CUDA_HOME} for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("DIP_KERNELS_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    extension = CUDAExtension("dip_kernels._C", cpp_sources + cuda_sources,
                          # USE_CUDA: the C shim declares its CUDA stream calls only then
                          define_macros=stable_abi_macros() + [("DIP_KERNELS_WITH_CUDA", None), ("USE_CUDA", None)],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, py_limited_api=True)
    # The CUDA runtime linked statically: no libcudart.so.<major> to find at load, so the module
    # loads beside a torch built for another CUDA major version (it needs a driver for this toolkit).
    extension.libraries = [("cudart_static" if lib == "cudart" else lib) for lib in extension.libraries] + ["rt"]
    return [extension]


if __name__ == "__main__":
    # A build from before the stable ABI (_C.cpython-*.so) would be imported ahead of the abi3 one.
    for stale in glob.glob(os.path.join(ROOT, "dip_kernels", "_C.cpython-*.so")):
        os.remove(stale)
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension},
          options={"bdist_wheel": {"py_limited_api": "cp310"}})
