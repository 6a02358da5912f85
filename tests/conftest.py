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


@pytest.fixture
def backend():
    """Use as ``backend("triton", op)``; restores every op's previous backend afterwards."""
    saved = {op: dip_kernels.get_backend(op) for op in dip_kernels.OPS}

    def select(name, op=None):
        dip_kernels.set_backend(name, op=op)
    yield select
    for op, name in saved.items():
        dip_kernels.set_backend(name, op=op)


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
