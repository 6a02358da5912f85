"""The card's own ceilings, measured in the same run as the suites so the report can say what
fraction of them each kernel reaches: a large bf16 matmul (8192^3 on GPU) for TFLOP/s and a large
device-to-device copy (1 GiB, bytes read + written) for GB/s. On the CPU: float32 512^3 and 16 MiB,
only to exercise the code.

Each result is in extra_info (``ceiling`` = "matmul_tflops" | "copy_gbps", ``ceiling_value``) and,
when $DIP_BENCH_OUT is set, also written to $DIP_BENCH_OUT/ceilings.json, which bench.report reads."""
import json
import os
import time

import pytest
import torch

from bench import cases, timing

if cases.ON_GPU:
    MATMUL_N, MATMUL_DTYPE, MATMUL_LABEL = 8192, torch.bfloat16, "bf16"
    COPY_BYTES = 2**30
else:
    MATMUL_N, MATMUL_DTYPE, MATMUL_LABEL = 512, torch.float32, "f32"
    COPY_BYTES = 16 * 2**20

_MARKS = [pytest.mark.gpu] if cases.ON_GPU else []


def _write_ceiling(key, value, device):
    out_dir = os.environ.get("DIP_BENCH_OUT")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ceilings.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update({key: value, "device_name": timing.device_name(device),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


@pytest.mark.parametrize("size", [pytest.param(MATMUL_N, id=f"{MATMUL_LABEL}-{MATMUL_N}", marks=_MARKS)])
def test_ceiling_matmul(benchmark, device, size):
    def make_inputs():
        return (cases.randn((size, size), MATMUL_DTYPE, device), cases.randn((size, size), MATMUL_DTYPE, device))

    flops = 2 * size ** 3
    info = cases.info("ceiling", "matmul", "fwd", MATMUL_LABEL, str(size), "torch", shape={"a": (size, size)},
                      flops=flops, bytes_moved=cases.tensor_bytes(*[((size, size), MATMUL_DTYPE)] * 3),
                      ceiling="matmul_tflops")
    summary = timing.run(benchmark, torch.mm, make_inputs, info=info, device=device)
    if summary:
        value = flops / (summary["time_ms"] * 1e-3) / 1e12
        benchmark.extra_info["ceiling_value"] = value
        _write_ceiling("matmul_tflops", value, device)
        _write_ceiling("matmul_case", f"{MATMUL_LABEL} {size}^3", device)


@pytest.mark.parametrize("nbytes", [pytest.param(COPY_BYTES, id=f"u8-{COPY_BYTES // 2**20}MiB", marks=_MARKS)])
def test_ceiling_copy(benchmark, device, nbytes):
    def make_inputs():
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        return torch.empty_like(src), src

    info = cases.info("ceiling", "copy", "fwd", "u8", f"{nbytes // 2**20}MiB", "torch", shape={"bytes": nbytes},
                      flops=None, bytes_moved=2 * nbytes, ceiling="copy_gbps")
    # both buffers far exceed L2: two sets are enough (and keep memory use small)
    summary = timing.run(benchmark, lambda dst, src: dst.copy_(src), make_inputs, info=info, device=device,
                         input_sets=2)
    if summary:
        value = 2 * nbytes / (summary["time_ms"] * 1e-3) / 1e9
        benchmark.extra_info["ceiling_value"] = value
        _write_ceiling("copy_gbps", value, device)
