"""The elementwise parts of a DiP block, computed in float32 (float64 for float64 inputs):
rmsnorm_modulate: rmsnorm(x)*weight*(1+scale)+shift   x (B,N,D); weight (D,); shift, scale (B,D)
gated_residual:   x + gate*f                           x, f (B,N,D); gate (B,D)
swiglu:           silu(a)*b with (a, b) the two halves of the last dim of ab (..., 2H) -> (..., H)
"""
import torch
import torch.nn.functional as F

from ._autograd import grads_by_recompute


def _compute_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def rmsnorm_modulate(x, weight, shift, scale, eps=1e-6, out_dtype=None):
    ct = _compute_dtype(x)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    y = y * (1 + scale.to(ct)[:, None, :]) + shift.to(ct)[:, None, :]
    return y.to(out_dtype or x.dtype)


def gated_residual(x, gate, f):
    ct = _compute_dtype(x)
    return (x.to(ct) + gate.to(ct)[:, None, :] * f.to(ct)).to(x.dtype)


def swiglu(ab):
    a, b = ab.to(_compute_dtype(ab)).chunk(2, dim=-1)
    return (F.silu(a) * b).to(ab.dtype)


def rmsnorm_modulate_forward(x, weight, shift, scale, eps, out_dtype=None):
    return rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype)


def rmsnorm_modulate_backward(grad_y, x, weight, shift, scale, eps):
    fn = lambda x, w, sh, sc: rmsnorm_modulate(x, w, sh, sc, eps, grad_y.dtype)  # noqa: E731
    return tuple(grads_by_recompute(fn, [x, weight, shift, scale], grad_y))


def gated_residual_forward(x, gate, f):
    return gated_residual(x, gate, f)


def gated_residual_backward(grad_y, x, gate, f):
    return tuple(grads_by_recompute(gated_residual, [x, gate, f], grad_y))


def swiglu_forward(ab):
    return swiglu(ab)


def swiglu_backward(grad_y, ab):
    return grads_by_recompute(swiglu, [ab], grad_y)[0]
