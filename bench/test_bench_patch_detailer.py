"""The Patch Detailer Head (torch.ops.dip.patch_detailer) on DiPXL16's shapes: 512 patches (one
256x256 image with guidance), 8192 (training batch 32) and 16384 (sampling batch 64), token dim
1152, 16x16 patches, bf16. fwdbwd differentiates w.r.t. the tokens and the 28 weights (the patches
are pixels: no gradient), FLOPs counted as 3x the forward's.

On a CPU, ``test_patch_detailer_onednn_side_by_side`` also times the onednn backend against the reference at
dip-demo's shapes, float32, the calls alternating in one process so that whatever else the machine
runs weighs on all alike: against the reference function under plain autograd (``reference``: a
backward that reuses the forward's activations) and against the op on its reference backend
(``op_reference``: what ``auto`` runs on a CPU, its backward re-running the forward). The ratios are
the record's ``speedup_vs_reference`` and ``speedup_vs_op_reference``."""
import math
import os
import statistics
import time

import pytest
import torch

import dip_kernels
from dip_kernels.reference import patch_detailer as ref

from bench import cases, providers, timing

PATCH = 16
if cases.ON_GPU:
    DTYPE, TOKEN_DIM = torch.bfloat16, 1152
    # slow: the extra shape that bench/gpu_check.sh leaves to --full / --suite patch_detailer
    CASES = [("fwd", "bf16", "512"), ("fwd", "bf16", "8192"), ("fwd", "bf16", "16384", True),
             ("fwdbwd", "bf16", "8192")]
else:
    DTYPE, TOKEN_DIM = torch.float32, 64
    # the Triton detailer under the CPU interpreter takes seconds per call: fwd only unless -m slow
    CASES = [("fwd", "f32", "2"), ("fwdbwd", "f32", "2", ("triton",))]


def detailer_weights(token_dim, dtype, device, requires_grad):
    ws = []
    for shape in ref.detailer_weight_shapes(token_dim):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) > 1 else 0.02
        ws.append(cases.randn(shape, dtype, device, scale, requires_grad))
    return ws


PATCH_DETAILER_PROVIDERS = providers.OP_PROVIDERS + ("onednn",)


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(CASES, PATCH_DETAILER_PROVIDERS))
def test_patch_detailer(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("patch_detailer", provider, device)
    m = int(case)
    train = mode == "fwdbwd"
    fn, backend = providers.op_implementation(provider, "patch_detailer", ref.patch_detailer,
                                              dip_kernels.patch_detailer)

    def make_inputs():
        patches = cases.randn((m, 3, PATCH, PATCH), DTYPE, device)
        tokens = cases.randn((m, TOKEN_DIM), DTYPE, device, requires_grad=train)
        weights = detailer_weights(TOKEN_DIM, DTYPE, device, train)
        if not train:
            return patches, tokens, weights
        return patches, tokens, weights, cases.randn((m, 3, PATCH, PATCH), DTYPE, device)

    call = cases.grad_fn(fn, 3, wrt=(1, 2)) if train else cases.no_grad_fn(fn)
    weight_bytes = cases.tensor_bytes(*[(s, DTYPE) for s in ref.detailer_weight_shapes(TOKEN_DIM)])
    io = cases.tensor_bytes(((m, 3, PATCH, PATCH), DTYPE), ((m, TOKEN_DIM), DTYPE), ((m, 3, PATCH, PATCH), DTYPE))
    fwd_flops = m * ref.flops_per_patch(PATCH, TOKEN_DIM)
    if train:  # + grad_out read, g_tokens and g_weights written
        bytes_moved = io + weight_bytes + cases.tensor_bytes(((m, 3, PATCH, PATCH), DTYPE), ((m, TOKEN_DIM), DTYPE)) \
            + weight_bytes
    else:
        bytes_moved = io + weight_bytes
    info = cases.info("patch_detailer", "patch_detailer", mode, dtype, case, provider,
                      shape={"patches": (m, 3, PATCH, PATCH), "tokens": (m, TOKEN_DIM)},
                      flops=3 * fwd_flops if train else fwd_flops, bytes_moved=bytes_moved,
                      flops_note="3x forward" if train else "forward convolutions")
    with backend:
        timing.run(benchmark, call, make_inputs, info=info, device=device)


# dip-demo's detailer calls per training step: 64x64 at batch 4 (the default) and 128x128 at batch 4
# (--thorough's size), token dim 768
DEMO_CASES = [pytest.param(mode, m, id=f"{mode}-f32-{m}x768", marks=[pytest.mark.slow] if m > 64 else [])
              for m in (64, 256) for mode in ("fwd", "fwdbwd")]


@pytest.mark.skipif(cases.ON_GPU, reason="the onednn backend runs on CPU tensors")
@pytest.mark.parametrize("mode,m", DEMO_CASES)
def test_patch_detailer_onednn_side_by_side(benchmark, mode, m):
    token_dim, train = 768, mode == "fwdbwd"
    patches = cases.randn((m, 3, PATCH, PATCH), torch.float32, "cpu")
    tokens = cases.randn((m, token_dim), torch.float32, "cpu", requires_grad=train)
    weights = detailer_weights(token_dim, torch.float32, "cpu", train)
    grad_out = cases.randn((m, 3, PATCH, PATCH), torch.float32, "cpu")
    wrap = (lambda fn: cases.grad_fn(fn, 3, wrt=(1, 2))) if train else cases.no_grad_fn
    calls = {"reference": wrap(ref.patch_detailer), "op_reference": wrap(dip_kernels.patch_detailer),
             "onednn": wrap(dip_kernels.patch_detailer)}
    args = (patches, tokens, weights, grad_out) if train else (patches, tokens, weights)
    times = {name: [] for name in calls}
    cpu_times = {name: [] for name in calls}

    def alternate():
        for name, fn in calls.items():
            with providers.op_backend("patch_detailer", "onednn" if name == "onednn" else "reference"):
                t, c = time.perf_counter(), time.process_time()
                fn(*args)
                times[name].append(time.perf_counter() - t)
                cpu_times[name].append(time.process_time() - c)

    _check_same_result(calls, args, m)
    t = time.perf_counter()
    alternate()  # warm-up (oneDNN's primitives) that also sizes the rounds
    seconds = float(os.environ.get("DIP_BENCH_SECONDS") or 4.0)
    rounds = 1 if benchmark.disabled or seconds <= 0 else int(max(3, min(15, seconds / (time.perf_counter() - t))))
    times, cpu_times = {name: [] for name in calls}, {name: [] for name in calls}
    benchmark.pedantic(alternate, rounds=rounds, iterations=1, warmup_rounds=0)
    flops = (3 if train else 1) * m * ref.flops_per_patch(PATCH, token_dim)
    # the ratios and rates use this process's CPU time, which other processes on a shared machine
    # do not inflate; on an idle machine with one thread it equals the wall time
    ms = {name: statistics.median(ts) * 1e3 for name, ts in cpu_times.items()}
    wall_ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    info = cases.info("patch_detailer", "patch_detailer", mode, "f32", f"{m}x768 demo", "onednn",
                      shape={"patches": (m, 3, PATCH, PATCH), "tokens": (m, token_dim)}, flops=flops,
                      bytes_moved=None, flops_note="3x forward" if train else "forward convolutions")
    info.update({"time_ms": wall_ms["onednn"], "wall_ms": wall_ms, "cpu_ms": ms,
                 "speedup_vs_reference": ms["reference"] / ms["onednn"],
                 "speedup_vs_op_reference": ms["op_reference"] / ms["onednn"],
                 "gflops": {name: flops / t / 1e6 for name, t in ms.items()}, "rounds": rounds,
                 "threads": torch.get_num_threads(),
                 "timer": "process_time (ratios, GFLOP/s) and perf_counter (time_ms), the three calls alternating"})
    benchmark.extra_info.update(info)
    print(f"\ndetailer {mode} {m}x768 f32, {torch.get_num_threads()} threads, CPU time: " + ", ".join(
        f"{name} {t:.1f} ms ({info['gflops'][name]:.0f} GFLOP/s)" for name, t in ms.items())
        + f"; onednn is {info['speedup_vs_reference']:.2f}x reference, {info['speedup_vs_op_reference']:.2f}x "
        "op_reference")


def _check_same_result(calls, args, m):
    """A sanity check that the timed calls compute the same thing (tests/test_patch_detailer_onednn.py
    checks how closely): each float32 result against float64, within the worst-case rounding of its
    longest sum. A weight gradient sums m * 16 * 16 products, and float32 rounding of a length-n sum
    is bounded by n * eps times the sum of the terms' magnitudes (Higham); PyTorch's own float32
    convolution backward reaches 9e-4 of the largest element at m = 64 on some inputs, so comparing
    the two float32 results with each other (their errors add) is no fixed-tolerance matter.
    No rounding bound covers a max-pool whose two largest inputs are within float32 rounding of each
    other: float32 and float64 can pick different ones, which sends one channel of one patch's
    gradient to another pixel (measured: 1 input in 30 at m = 64, one output channel of enc4's weight
    gradient, 5e-3 of its largest element). So the elements beyond the bound may make up at most one
    output channel's worth; a wrong kernel is off nearly everywhere."""
    bound = m * PATCH * PATCH * torch.finfo(torch.float32).eps
    exact = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
             else [w.detach().double().requires_grad_(w.requires_grad) for w in a] for a in args]
    want = _flat(calls["reference"](*exact))
    for name in ("onednn", "reference"):
        with providers.op_backend("patch_detailer", "onednn" if name == "onednn" else "reference"):
            got = _flat(calls[name](*args))
        for i, (g, w) in enumerate(zip(got, want)):
            off = (g.double() - w).abs() > bound * w.abs().max()
            allowed = g.numel() // g.shape[0] if g.dim() > 1 else 0
            assert off.sum().item() <= allowed, (
                f"{name}: result {i} {tuple(g.shape)} has {off.sum().item()} elements more than {bound:.1e} of its "
                f"largest off float64 (at most {allowed}, one output channel, allowed)")


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in _flat(item)]
