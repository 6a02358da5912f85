import os
import shutil

# Without a GPU, Triton kernels run through Triton's CPU interpreter; it must be chosen before
# triton is imported anywhere.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter's tl.dot is a numpy matmul on tiny tiles: OpenBLAS threads only add overhead
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dip_kernels  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _openblas_thread_controls():
    """(get, set) of the OpenBLAS that numpy loaded, or None."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                          ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, set_):
                return getattr(lib, get), getattr(lib, set_)
    return None


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_numpy_blas():
    # Triton's interpreter runs tl.dot as numpy matmuls on small tiles; on a shared CPU, OpenBLAS's
    # thread pool makes those cost about 3x the CPU time of one thread
    controls = _openblas_thread_controls() if dip_kernels.backends.triton_interpreted() else None
    if controls is None:
        yield
        return
    get, set_ = controls
    old = get()
    set_(1)
    try:
        yield
    finally:
        set_(old)


@pytest.fixture(autouse=True)
def _backends_left_as_found():
    """A test that changes an op's backend without restoring it fails here, not in whichever later test
    dispatches that op (the choice is process-wide)."""
    before = {op: dip_kernels.get_backend(op) for op in dip_kernels.OPS}
    threads = torch.get_num_threads()
    yield
    after = {op: dip_kernels.get_backend(op) for op in dip_kernels.OPS}
    changed = {op: (before[op], after[op]) for op in before if before[op] != after[op]}
    for op, (name, _) in changed.items():
        dip_kernels.set_backend(name, op=op)
    left_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert not changed, f"the test left backends changed (op: (before, after)): {changed}"
    assert left_threads == threads, f"the test left torch's threads at {left_threads}, was {threads}"


@pytest.fixture
def backend():
    """Use as ``backend("triton", op)``; restores every op's previous backend afterwards."""
    saved = {op: dip_kernels.get_backend(op) for op in dip_kernels.OPS}

    def select(name, op=None):
        dip_kernels.set_backend(name, op=op)
    yield select
    for op, name in saved.items():
        dip_kernels.set_backend(name, op=op)


@pytest.fixture
def gpu_machine(monkeypatch):
    """Dispatch as on a GPU machine with the CUDA build: every backend an op has is available, and
    the Triton modules declare what they do when Triton compiles instead of interpreting."""
    from dip_kernels import backends
    from dip_kernels.triton import attention, capability
    monkeypatch.setattr(backends, "_unavailable_reason",
                        lambda op, b: None if backends.has_backend(op, b) else "absent")
    for family in backends.ops():
        if backends.has_backend(family, "triton"):
            module = backends._module(family, "triton")
            monkeypatch.setattr(module, "CAPABILITY", capability(interpreted=False))
    monkeypatch.setattr(attention, "CAPABILITY", attention.attention_capability(False))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh random inputs each run; a failing test prints its seed, and DIP_TEST_SEED=<seed> repeats it
    seed = int(os.environ.get("DIP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"torch.manual_seed({seed}); rerun with DIP_TEST_SEED={seed}"))
