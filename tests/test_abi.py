"""One build of dip_kernels._C loads and passes the op tests under other torch versions.

For each (build torch A, run torch B) pair a wheel is built once in a venv with torch A (the CUDA
kernels too, when a toolkit is found), installed into a venv with torch B, imported there, checked
to register every op that csrc/ defines, and run through the extension's CPU tests from a copy of
tests/ (so that the installed wheel, not this source tree, is what gets imported).

Slow (a wheel build per build version, a venv per torch version on first use), so the cross-version
test runs only with DIP_KERNELS_TEST_ABI=1, which `make test-abi` sets. Knobs:
  DIP_ABI_PAIRS   comma-separated A:B pairs (default below: both directions between 2.11.0 and
                  2.14.1, and the oldest supported torch)
  DIP_ABI_VENVS   where the venvs and wheels are cached between runs (default
                  ~/.cache/dip-kernels/abi); never inside the source tree
  DIP_ABI_PYTHON  the interpreter the venvs are made from (default python3)
  DIP_ABI_ARCH_LIST  TORCH_CUDA_ARCH_LIST of the test wheels (default 8.0: the ABI does not depend
                  on the architecture, and `make test` checks every architecture's compile)
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PAIRS = "2.14.1:2.11.0,2.11.0:2.14.1,2.14.1:2.10.0"
# The extension's tests that run on CPU: its build, the CUDA lowering against the ops' contracts,
# and the backend selection (whose cuda backend needs the extension loaded with CUDA).
CPU_TESTS = ["tests/test_build.py", "tests/test_patch_detailer_cuda.py", "tests/test_backends.py"]
CPU_TEST_FILTER = "not triton"
VENV_PACKAGES = ["numpy", "tqdm", "pyyaml", "pillow", "pytest", "pytest-benchmark", "ninja", "setuptools", "wheel"]



def _pairs_of(spec):
    return [tuple(p.strip().split(":")) for p in spec.split(",") if p.strip()]


def _pairs():
    return _pairs_of(os.environ.get("DIP_ABI_PAIRS", DEFAULT_PAIRS))


def _cache_dir():
    path = os.path.abspath(os.path.expanduser(os.environ.get("DIP_ABI_VENVS", "~/.cache/dip-kernels/abi")))
    if path == ROOT or path.startswith(ROOT + os.sep):
        pytest.fail(f"DIP_ABI_VENVS={path} lies inside the source tree; choose a directory outside it")
    os.makedirs(path, exist_ok=True)
    return path


def _run(cmd, log, **kwargs):
    """Runs cmd, appending its output to log; the log's tail is the failure message."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    if proc.returncode != 0:
        tail = open(log, errors="replace").read()[-4000:]
        pytest.fail(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def venv_python(torch_version):
    """The python of a cached venv holding torch==torch_version and the test dependencies."""
    venv = os.path.join(_cache_dir(), f"torch-{torch_version}")
    python = os.path.join(venv, "bin", "python")
    ready = os.path.join(venv, ".ready")
    if not os.path.exists(ready):
        log = venv + ".log"
        shutil.rmtree(venv, ignore_errors=True)
        _run([os.environ.get("DIP_ABI_PYTHON", "python3"), "-m", "venv", venv], log)
        _run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}", *VENV_PACKAGES], log)
        open(ready, "w").close()
    return python


def _source_digest():
    """A hash of everything that goes into the wheel, so a cached wheel is rebuilt after an edit."""
    h = hashlib.sha256()
    files = ["setup.py", "pyproject.toml", *glob.glob("csrc/**/*", recursive=True),
             *glob.glob("dip_kernels/**/*.py", recursive=True), *glob.glob("dip/**/*.py", recursive=True)]
    for rel in sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f))):
        h.update(rel.encode())
        h.update(open(os.path.join(ROOT, rel), "rb").read())
    return h.hexdigest()[:16]


def build_wheel(torch_version):
    """The abi3 wheel built from this tree in the torch_version venv (cached by source digest)."""
    out = os.path.join(_cache_dir(), "wheels", f"built-with-torch-{torch_version}-{_source_digest()}")
    wheels = glob.glob(os.path.join(out, "dip_kernels-*.whl"))
    if wheels:
        return wheels[0]
    python = venv_python(torch_version)
    build_dir = out + ".build"
    shutil.rmtree(build_dir, ignore_errors=True)
    # a copy of the tree, so that this build's objects never mix with the editable install's
    shutil.copytree(ROOT, build_dir, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "demo_out*", "outputs"))
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("DIP_ABI_ARCH_LIST", "8.0"))
    _run([python, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", out, build_dir],
         out + ".log", env=env)
    shutil.rmtree(build_dir, ignore_errors=True)
    wheels = glob.glob(os.path.join(out, "dip_kernels-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    return wheels[0]


def defined_ops():
    """The op names csrc/ defines (m.def("name(...")) in its STABLE_TORCH_LIBRARY blocks."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")):
        names.update(re.findall(r'm\.def\(\s*"(\w+)\(', open(path).read()))
    return sorted(names)


def test_defined_ops_parses_csrc():
    ops = defined_ops()
    assert "built_with_cuda" in ops and "patch_detailer_conv_gemm_" in ops
    assert "Tensor" not in ops  # an argument type inside a schema is not an op


def test_install_page_names_the_tested_range():
    page = open(os.path.join(ROOT, "docs", "install.md")).read()
    assert DEFAULT_PAIRS in page
    for build_torch, run_torch in _pairs_of(DEFAULT_PAIRS):
        assert build_torch in page and run_torch in page


@pytest.mark.skipif(os.environ.get("DIP_KERNELS_TEST_ABI") != "1",
                    reason="cross-version build test: run `make test-abi` (DIP_KERNELS_TEST_ABI=1)")
@pytest.mark.parametrize("build_torch,run_torch", _pairs())
def test_wheel_runs_under_another_torch(build_torch, run_torch, tmp_path):
    wheel = build_wheel(build_torch)
    python = venv_python(run_torch)
    log = str(tmp_path / "run.log")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel], log)

    # import the extension itself (an import error is the failure this test exists for), then
    # compare the registered ops with what csrc/ defines
    check = (
        "import sys, torch, dip_kernels._C\n"
        "ops = sorted(n.split('::')[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('dip_C::'))\n"
        "print(torch.__version__, torch.ops.dip_C.built_with_cuda(), ' '.join(ops))\n")
    out = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, f"the wheel built with torch {build_torch} does not load in {run_torch}:\n{out.stderr}"
    version, _, registered = out.stdout.strip().split(" ", 2)
    assert version.startswith(run_torch), out.stdout
    assert registered.split() == defined_ops(), f"registered {registered}, csrc defines {defined_ops()}"
    assert re.search(r"-cp\d+-abi3-", os.path.basename(wheel)), f"{wheel} is not an abi3 wheel"

    # the extension's CPU tests, from a copy of tests/ so that the installed package is imported
    shutil.copytree(os.path.join(ROOT, "tests"), tmp_path / "tests")
    tests = [str(tmp_path / t) for t in CPU_TESTS]
    proc = subprocess.run([python, "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
                           "-k", CPU_TEST_FILTER, "--rootdir", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, f"op tests under torch {run_torch}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout[-2000:]
