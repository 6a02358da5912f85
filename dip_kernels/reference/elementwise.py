"""The elementwise parts of a DiP block, computed in float32 (float64 for float64 inputs):
rmsnorm_modulate: rmsnorm(x)*weight*(1+scale)+shift   x (B,N,D); weight (D,); shift, scale (B,D)
gated_residual:   x + gate*f                           x, f (B,N,D); gate (B,D)
swiglu:           silu(a)*b with (a, b) the two halves of the last dim of ab (..., 2H) -> (..., H)

The backward functions are the forward's derivative written out (tests check them against autograd
of the forward in float64), in the forward's compute dtype, each gradient in its input's dtype.
"""
import torch
import torch.nn.functional as F


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
    ct = _compute_dtype(x)
    g, xf, w = grad_y.to(ct), x.to(ct), weight.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    one_plus = 1 + scale.to(ct)[:, None, :]
    g_xhat = g * w * one_plus
    gx = rstd * (g_xhat - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
    g_weight = (g * xhat * one_plus).sum((0, 1))
    g_shift = g.sum(1)
    g_scale = (g * xhat * w).sum(1)
    return gx.to(x.dtype), g_weight.to(weight.dtype), g_shift.to(shift.dtype), g_scale.to(scale.dtype)


def gated_residual_forward(x, gate, f):
    return gated_residual(x, gate, f)


def gated_residual_backward(grad_y, x, gate, f):
    ct = _compute_dtype(x)
    g = grad_y.to(ct)
    g_gate = (g * f.to(ct)).sum(1)
    g_f = g * gate.to(ct)[:, None, :]
    return g.to(x.dtype), g_gate.to(gate.dtype), g_f.to(f.dtype)


def swiglu_forward(ab):
    return swiglu(ab)


def swiglu_backward(grad_y, ab):
    a, b = ab.to(_compute_dtype(ab)).chunk(2, dim=-1)
    g = grad_y.to(a.dtype)
    sig = torch.sigmoid(a)
    g_a = g * b * sig * (1 + a * (1 - sig))
    return torch.cat([g_a, g * F.silu(a)], dim=-1).to(ab.dtype)
