"""The fused elementwise ops of a DiP block, with the dtypes DiPXL16 uses under bf16 autocast
(dtype label "amp"): the residual stream x and the (B, D) modulation tensors are float32, Linear
outputs bf16.

  rmsnorm_modulate  x (B, 256, 1152) f32, weight/shift/scale f32 -> bf16 (the next Linear's input)
  gated_residual    x f32 + gate f32 * f bf16 -> f32
  swiglu            ab (B, 256, 2*3072) bf16 -> bf16

B = 32 (training) and 64 (sampling). Memory-bound: GB/s is the measure (FLOPs not counted)."""
import pytest
import torch

import dip_kernels
from dip_kernels.reference import elementwise as ref

from bench import cases, providers, timing

EPS = 1e-6
if cases.ON_GPU:
    D, HIDDEN, TOKENS = 1152, 3072, 256
    BATCHES = {"b32": 32, "b64": 64}
    LABEL = "amp"
    STREAM, LOW = torch.float32, torch.bfloat16
else:
    D, HIDDEN, TOKENS = 64, 96, 16
    BATCHES = {"b2": 2}
    LABEL = "f32"
    STREAM, LOW = torch.float32, torch.float32
# slow (GPU): the sampling batch, which bench/gpu_check.sh leaves to --full / --suite elementwise
CASES = [(mode, LABEL, label, cases.ON_GPU and label == "b64") for label in BATCHES for mode in ("fwd", "fwdbwd")]


def _bytes(*pairs):
    return cases.tensor_bytes(*pairs)


def _call(fn, train, n_inputs, wrt):
    return cases.grad_fn(fn, n_inputs, wrt) if train else cases.no_grad_fn(fn)


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(CASES, providers.OP_PROVIDERS))
def test_rmsnorm_modulate(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("rmsnorm_modulate", provider, device)
    b, train = BATCHES[case], mode == "fwdbwd"
    out_dtype = LOW

    def reference(x, w, shift, scale):
        return ref.rmsnorm_modulate(x, w, shift, scale, EPS, out_dtype)

    def dip(x, w, shift, scale):
        return dip_kernels.rmsnorm_modulate(x, w, shift, scale, EPS, out_dtype)

    fn, backend = providers.op_implementation(provider, "rmsnorm_modulate", reference, dip)

    def make_inputs():
        args = (cases.randn((b, TOKENS, D), STREAM, device, requires_grad=train),
                (1 + 0.1 * torch.randn(D, device=device)).to(STREAM).requires_grad_(train),
                cases.randn((b, D), STREAM, device, 0.1, train), cases.randn((b, D), STREAM, device, 0.1, train))
        return args + (cases.randn((b, TOKENS, D), out_dtype, device),) if train else args

    x_b, y_b = _bytes(((b, TOKENS, D), STREAM)), _bytes(((b, TOKENS, D), out_dtype))
    small = _bytes(((D,), STREAM), ((b, D), STREAM), ((b, D), STREAM))
    # fwd: x, weight, shift, scale read, y written; fwdbwd: + grad_y read, gx and the small grads written
    moved = x_b + small + y_b + ((y_b + x_b + small) if train else 0)
    info = cases.info("elementwise", "rmsnorm_modulate", mode, dtype, case, provider,
                      shape={"x": (b, TOKENS, D), "x_dtype": str(STREAM), "out_dtype": str(out_dtype)},
                      flops=None, bytes_moved=moved)
    with backend:
        timing.run(benchmark, _call(fn, train, 4, (0, 1, 2, 3)), make_inputs, info=info, device=device)


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(CASES, providers.OP_PROVIDERS))
def test_gated_residual(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("gated_residual", provider, device)
    b, train = BATCHES[case], mode == "fwdbwd"
    fn, backend = providers.op_implementation(provider, "gated_residual", ref.gated_residual,
                                              dip_kernels.gated_residual)

    def make_inputs():
        args = (cases.randn((b, TOKENS, D), STREAM, device, requires_grad=train),
                cases.randn((b, D), STREAM, device, 0.1, train),
                cases.randn((b, TOKENS, D), LOW, device, requires_grad=train))
        return args + (cases.randn((b, TOKENS, D), STREAM, device),) if train else args

    x_b, f_b, g_b = _bytes(((b, TOKENS, D), STREAM)), _bytes(((b, TOKENS, D), LOW)), _bytes(((b, D), STREAM))
    # fwd: x, gate, f read, y written; fwdbwd: + grad_y read, gx, ggate, gf written
    moved = 2 * x_b + f_b + g_b + ((x_b + x_b + g_b + f_b) if train else 0)
    info = cases.info("elementwise", "gated_residual", mode, dtype, case, provider,
                      shape={"x": (b, TOKENS, D), "x_dtype": str(STREAM), "f_dtype": str(LOW)},
                      flops=None, bytes_moved=moved)
    with backend:
        timing.run(benchmark, _call(fn, train, 3, (0, 1, 2)), make_inputs, info=info, device=device)


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(CASES, providers.OP_PROVIDERS))
def test_swiglu(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("swiglu", provider, device)
    b, train = BATCHES[case], mode == "fwdbwd"
    fn, backend = providers.op_implementation(provider, "swiglu", ref.swiglu, dip_kernels.swiglu)

    def make_inputs():
        ab = cases.randn((b, TOKENS, 2 * HIDDEN), LOW, device, requires_grad=train)
        return (ab, cases.randn((b, TOKENS, HIDDEN), LOW, device)) if train else (ab,)

    ab_b, y_b = _bytes(((b, TOKENS, 2 * HIDDEN), LOW)), _bytes(((b, TOKENS, HIDDEN), LOW))
    # fwd: ab read, y written; fwdbwd: + grad_y read, g_ab written
    moved = ab_b + y_b + ((y_b + ab_b) if train else 0)
    info = cases.info("elementwise", "swiglu", mode, dtype, case, provider,
                      shape={"ab": (b, TOKENS, 2 * HIDDEN), "dtype": str(LOW)}, flops=None, bytes_moved=moved)
    with backend:
        timing.run(benchmark, _call(fn, train, 1, (0,)), make_inputs, info=info, device=device)
