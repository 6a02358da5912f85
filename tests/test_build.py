"""What the build produced: the CUDA kernels compiled without register spills or local memory
(ptxas -v output that `make setup` keeps in build/install.log), an extension that depends on
torch only through the LibTorch stable ABI, and the CMake build of the same sources loads as an
extension. (tests/test_abi.py loads one build under other torch versions.)"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_LOG = os.path.join(ROOT, "build", "install.log")
CMAKE_DIR = os.path.join(ROOT, "build", "cmake")


def _ptxas_reports(log):
    """(function, arch, stack_bytes, spill_store_bytes, spill_load_bytes) for each compiled kernel."""
    reports, function, arch = [], None, None
    for line in log.splitlines():
        m = re.search(r"ptxas info\s*: Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            function, arch = m.groups()
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and function:
            reports.append((function, arch, *map(int, m.groups())))
            function = None
    return reports


def built_architectures(log):
    """The sm_* targets the build was asked for: setup.py prints the TORCH_CUDA_ARCH_LIST it builds
    with ("8.0;9.0a" -> sm_80, sm_90a)."""
    m = re.search(r"dip-kernels: building CUDA kernels with .* for (\S+)", log)
    if not m:
        return None
    return {"sm_" + a.split("+")[0].replace(".", "") for a in re.split(r"[;\s]+", m.group(1)) if a}


def test_cuda_kernels_have_no_spills_or_stack():
    if not os.path.exists(INSTALL_LOG):
        pytest.skip("no build/install.log: the extension was not built by `make setup`")
    log = open(INSTALL_LOG, errors="replace").read()
    reports = _ptxas_reports(log)
    if not reports:
        pytest.skip("no ptxas report in the build log (CPU-only build)")
    archs = {arch for _, arch, *_ in reports}
    asked = built_architectures(log)
    assert asked, "the build log does not say which architectures it built"
    assert asked <= archs, f"kernels were asked for {sorted(asked)} but ptxas compiled them for {sorted(archs)}"
    bad = [r for r in reports if any(r[2:])]
    assert not bad, f"kernels with stack frames or spills: {bad}"


def test_built_architectures_parses_the_arch_list():
    assert built_architectures("dip-kernels: building CUDA kernels with /usr/local/cuda for 8.0;9.0a\n") == \
        {"sm_80", "sm_90a"}
    assert built_architectures("dip-kernels: building CUDA kernels with /x for 8.6+PTX\n") == {"sm_86"}
    assert built_architectures("no such line") is None


def test_cmake_build_loads():
    lib = [f for f in os.listdir(CMAKE_DIR)] if os.path.isdir(CMAKE_DIR) else []
    if not any(f.startswith("_C") and f.endswith(".so") for f in lib):
        pytest.skip("no CMake build in build/cmake (run `make build-cmake`)")
    code = "import torch, _C; print(torch.ops.dip_C.built_with_cuda())"
    out = subprocess.run([sys.executable, "-c", code], cwd=CMAKE_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")


# Headers outside the stable ABI. The build's TORCH_STABLE_ONLY turns torch's own into a compile
# error; pybind11 is not torch's, so it is only caught here.
UNSTABLE_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](ATen/|c10/|torch/(library|extension|all|python|script)\.h|'
                              r'torch/csrc/api/|pybind11/)', re.M)


def test_csrc_includes_only_the_stable_abi():
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)
    if not sources:
        pytest.skip("no csrc/ here (tests run from a copy, against an installed wheel)")
    bad = [(os.path.relpath(p, ROOT), m.group(0).strip()) for p in sources
           for m in UNSTABLE_INCLUDE.finditer(open(p).read())]
    assert not bad, f"unstable includes: {bad}"


def test_unstable_include_pattern():
    assert UNSTABLE_INCLUDE.search("#include <ATen/ATen.h>")
    assert UNSTABLE_INCLUDE.search('#include "c10/cuda/CUDAGuard.h"')
    assert UNSTABLE_INCLUDE.search("#include <torch/library.h>")
    assert not UNSTABLE_INCLUDE.search("#include <torch/csrc/stable/library.h>")
    assert not UNSTABLE_INCLUDE.search("#include <torch/headeronly/core/ScalarType.h>")


# Mangled C++ names of torch's unstable libraries (c10::, at::, torch::, pybind11::): a build that
# needs one of them loads only in the torch it was built against ("undefined symbol:
# _ZN3c104cuda19CUDAErrorLogCaptureC1Ev" in another). The stable ABI is the C shim (aoti_torch_*,
# torch_*), plus header-only inline code.
UNSTABLE_SYMBOL = re.compile(r"^_ZN(K?)(3c10|2at|5torch|8pybind11)")


def test_extension_needs_only_stable_abi_symbols():
    spec = importlib.util.find_spec("dip_kernels._C")
    if spec is None:
        pytest.skip("dip_kernels._C is not built")
    built = spec.origin
    if shutil.which("nm") is None:
        pytest.skip("no nm to list the extension's undefined symbols")
    out = subprocess.run(["nm", "-D", "--undefined-only", built], capture_output=True, text=True, check=True)
    undefined = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert any(name.startswith("aoti_torch_") for name in undefined), "no stable C shim symbol: is this the extension?"
    unstable = [name for name in undefined if UNSTABLE_SYMBOL.match(name)]
    assert not unstable, f"{built} needs symbols outside the stable ABI: {unstable[:10]}"


def test_unstable_symbol_pattern():
    assert UNSTABLE_SYMBOL.match("_ZN3c104cuda19CUDAErrorLogCaptureC1Ev")
    assert UNSTABLE_SYMBOL.match("_ZN2at4_ops3add4callERKNS_6TensorE")
    assert not UNSTABLE_SYMBOL.match("aoti_torch_get_current_cuda_stream")
    assert not UNSTABLE_SYMBOL.match("_ZNSt6thread6_StateD2Ev")
