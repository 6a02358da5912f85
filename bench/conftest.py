"""pytest setup for the benchmark suites.

Shapes are chosen at collection time for the device the run uses (bench.timing.bench_device):
GPU: DiPXL16's real shapes in bf16, every case marked ``gpu``; the costliest (torch.compile of the
whole model for the training step, extra shapes) also ``slow``, so ``-m "gpu and not slow"`` is the
quick GPU pass. CPU: tiny float32 shapes that only prove the code runs; ``pytest bench -m "not gpu"``
(or plain ``pytest bench`` without a GPU) finishes in about a minute on two cores.
"""
import os
import shutil
import signal

# Without a GPU, the Triton backends run under Triton's CPU interpreter, which must be chosen before
# triton is imported anywhere (tests/conftest.py does the same).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dip_kernels  # noqa: E402

from bench import timing  # noqa: E402

ON_GPU = timing.on_gpu()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # A run stopped by `timeout` (bench/gpu_check.sh) leaves the interrupted benchmark with no
    # rounds, and pytest-benchmark would then fail to write the JSON of every finished one: drop it.
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
    yield


def pytest_configure(config):
    # SIGTERM (timeout's default) and SIGINT end the run like Ctrl-C, so pytest still finishes the
    # session and writes the benchmark JSON of everything measured so far; explicit because a
    # process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    if ON_GPU:
        # the settings the reference numbers (shared/ANCHORS.md) were taken with
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton
    device = timing.bench_device()
    machine_info["bench_device"] = str(device)
    machine_info["gpu"] = timing.gpu_facts() if device.type == "cuda" else {}
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = getattr(triton, "__version__", "?")
    machine_info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    machine_info["dip_backends_available"] = {
        op: dip_kernels.available_backends(op, device) for op in dip_kernels.OPS}


@pytest.fixture(autouse=True)
def _restore_backends():
    saved = {op: dip_kernels.get_backend(op) for op in dip_kernels.OPS}
    yield
    for op, name in saved.items():
        dip_kernels.set_backend(name, op=op)


@pytest.fixture(autouse=True)
def _seed():
    # fresh random inputs every run (timings must not depend on the values), never zeros
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    yield


@pytest.fixture
def device():
    return timing.bench_device()
