"""rmsnorm_modulate, gated_residual, swiglu: the reference (forward and its written-out backward)
against independent float64 formulas, the op layer (gradcheck, fake shapes), bad inputs, the
Triton backward's fresh and deterministic results, and on a GPU bf16 at real sizes.

Every backend against the reference over the ops' sample catalogues, opcheck, torch.compile and
CUDA-graph capture are tests/test_backends.py; the inputs are the catalogue's builders
(tests/conformance.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import dip_kernels
from dip_kernels.reference import elementwise as ref

import conformance
from conformance import gated_residual_inputs, rmsnorm_modulate_inputs

EPS = 1e-6


# ---------------------------------------------------------------- float64 ground truth
def _fp64_grads(fn, inputs, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


def rmsnorm_modulate_fp64(x, w, shift, scale):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
    return y * (1 + scale[:, None, :]) + shift[:, None, :]


def gated_residual_fp64(x, gate, f):
    return x + gate[:, None, :] * f


def swiglu_fp64(ab):
    a, b = ab.chunk(2, dim=-1)
    return F.silu(a) * b


@pytest.mark.parametrize("op,formula", [("rmsnorm_modulate", rmsnorm_modulate_fp64),
                                        ("gated_residual", gated_residual_fp64), ("swiglu", swiglu_fp64)])
def test_reference_matches_independent_fp64_formulas(op, formula):
    """In float64 the reference (forward, and its written-out backward) is the formulas: checked on
    every sample of the op's catalogue."""
    for sample in conformance.SAMPLES[op]:
        args = [a.double() if isinstance(a, torch.Tensor) else a for a in sample.make(torch.float64, "cpu")]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        y = getattr(ref, f"{op}_forward")(*args[:-1] if op == "rmsnorm_modulate" else args)
        grad_y = torch.randn_like(y)
        grads = getattr(ref, f"{op}_backward")(grad_y, *args[:-1] if op == "rmsnorm_modulate" else args)
        want, want_grads = _fp64_grads(formula, tensors, grad_y)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, msg=f"{op} {sample.name}")
        for g, w in zip(grads if isinstance(grads, tuple) else (grads,), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"{op} {sample.name}")


# The ops compute in float32 by contract, even for float64 tensors, so finite differences need a
# step far above float32 rounding: eps=1e-3 makes the difference quotient's rounding error ~1e-4.
_GRADCHECK_TOL = dict(eps=1e-3, atol=2e-3, rtol=2e-3)


def test_gradcheck():
    x, w, shift, scale = (t.double().requires_grad_(True) for t in rmsnorm_modulate_inputs(2, 3, 5, torch.float32))
    assert torch.autograd.gradcheck(lambda *a: dip_kernels.rmsnorm_modulate(*a, eps=EPS), (x, w, shift, scale),
                                    **_GRADCHECK_TOL)
    x, gate, f = (t.double().requires_grad_(True) for t in gated_residual_inputs(2, 3, 5, torch.float32))
    assert torch.autograd.gradcheck(dip_kernels.gated_residual, (x, gate, f), **_GRADCHECK_TOL)
    ab = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dip_kernels.swiglu, (ab,), **_GRADCHECK_TOL)


def test_fake_shapes():
    with FakeTensorMode():
        x = torch.empty(2, 16, 64, dtype=torch.float32)
        w = torch.empty(64, dtype=torch.bfloat16)
        mod = torch.empty(2, 64)
        y = dip_kernels.rmsnorm_modulate(x, w, mod, mod, out_dtype=torch.bfloat16)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        r = dip_kernels.gated_residual(x, mod, torch.empty(2, 16, 64, dtype=torch.bfloat16))
        assert r.shape == x.shape and r.dtype == torch.float32
        s = dip_kernels.swiglu(torch.empty(2, 16, 6, 128, dtype=torch.float16))
        assert s.shape == (2, 16, 6, 64) and s.dtype == torch.float16


# ---------------------------------------------------------------- bad inputs
def _bad_calls():
    x, w, shift, scale = rmsnorm_modulate_inputs(2, 3, 8, torch.float32)
    xg, gate, f = gated_residual_inputs(2, 3, 8, torch.float32, f_dtype=torch.float16)
    rms = dip_kernels.rmsnorm_modulate
    return [
        (lambda: rms(x[0], w, shift, scale), "x must have rank 3"),
        (lambda: rms(x, w[:4], shift, scale), "weight"),
        (lambda: rms(x, w, shift[:1], scale), "shift"),
        (lambda: rms(x, w, shift, scale[:, :4]), "scale"),
        (lambda: rms(x, w, shift.double(), scale), "shift"),
        (lambda: rms(x, w, shift, scale.half()), "scale"),
        (lambda: dip_kernels.gated_residual(xg[0], gate, f[0]), "x must have rank 3"),
        (lambda: dip_kernels.gated_residual(xg, gate[:1], f), "gate"),
        (lambda: dip_kernels.gated_residual(xg, gate.half(), f), "gate"),
        (lambda: dip_kernels.gated_residual(xg, gate, f[:, :2]), "f must have shape"),
        (lambda: dip_kernels.swiglu(torch.randn(2, 3, 7)), "ab"),
        (lambda: dip_kernels.swiglu(torch.randint(0, 5, (2, 4))), "ab"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs(index):
    call, match = _bad_calls()[index]
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- the Triton kernels
def test_triton_backward_fresh_and_deterministic():
    from dip_kernels.triton import elementwise as tri
    x, gate, f = gated_residual_inputs(2, 37, 1000, torch.float16)
    grad_y = torch.randn_like(x)
    gx, ggate, gf = tri.gated_residual_backward(grad_y, x, gate, f)
    assert gx.data_ptr() != grad_y.data_ptr() and torch.equal(gx, grad_y)
    # partial sums + torch.sum, no atomics: bitwise repeatable
    assert all(torch.equal(a, b) for a, b in zip((gx, ggate, gf), tri.gated_residual_backward(grad_y, x, gate, f)))
    inputs = rmsnorm_modulate_inputs(2, 37, 1000, torch.float32)
    first = tri.rmsnorm_modulate_backward(grad_y.float(), *inputs, EPS)
    assert all(torch.equal(a, b) for a, b in zip(first, tri.rmsnorm_modulate_backward(grad_y.float(), *inputs, EPS)))


# ---------------------------------------------------------------- GPU: real sizes, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_gpu_rmsnorm_modulate_real_size(backend, x_dtype):
    # float32 residual stream with bf16 output is the autocast case; bf16 in and out the pure one
    backend("triton", "rmsnorm_modulate")
    args = list(rmsnorm_modulate_inputs(32, 256, 1152, x_dtype, "cuda", torch.float32)) + [EPS, torch.bfloat16]
    conformance.check_against_reference("rmsnorm_modulate", "triton", args)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_gpu_gated_residual_real_size(backend, x_dtype):
    backend("triton", "gated_residual")
    conformance.check_against_reference("gated_residual", "triton",
                                        list(gated_residual_inputs(32, 256, 1152, x_dtype, "cuda", torch.bfloat16)))


@pytest.mark.gpu
def test_gpu_swiglu_real_size(backend):
    backend("triton", "swiglu")
    ab = torch.randn(32, 256, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    conformance.check_against_reference("swiglu", "triton", [ab])
