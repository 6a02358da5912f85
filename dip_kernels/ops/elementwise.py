"""The elementwise parts of a DiP block, computed in float32 (float64 for float64 inputs):
rmsnorm_modulate  rmsnorm(x)*weight*(1+scale)+shift   x (B,N,D); weight (D,); shift, scale (B,D)
gated_residual    x + gate*f                           x, f (B,N,D); gate (B,D); the result in x's dtype
swiglu            silu(a)*b, (a, b) the halves of ab's last dim (..., 2H) -> (..., H)
"""
from typing import Optional

import torch
from torch import Tensor

from .. import opspec
from ..opspec import Backward, OpSpec, define
from ..reference import elementwise as _ref
from . import checks

BACKENDS = {"triton": "dip_kernels.triton.elementwise", "reference": "dip_kernels.reference.elementwise"}


def check_rmsnorm_modulate(x, weight, shift, scale, eps=None, out_dtype=None):
    checks.tensor("x", x, rank=3)
    b, _, d = x.shape
    checks.tensor("weight", weight, rank=1)
    checks.same("weight", weight, "x", x, dtype=False)
    checks.shape("weight", weight, (d,))
    for name, t in (("shift", shift), ("scale", scale)):
        checks.tensor(name, t, rank=2)
        checks.same(name, t, "x", x)
        checks.shape(name, t, (b, d))


def check_gated_residual(x, gate, f):
    checks.tensor("x", x, rank=3)
    checks.tensor("gate", gate, rank=2)
    checks.same("gate", gate, "x", x)
    checks.shape("gate", gate, (x.shape[0], x.shape[2]))
    checks.tensor("f", f, rank=3)
    checks.same("f", f, "x", x, dtype=False)
    checks.shape("f", f, x.shape)


def check_swiglu(ab):
    checks.tensor("ab", ab)
    if ab.dim() < 1 or ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dim (the two halves a, b), got shape {tuple(ab.shape)}")


def rmsnorm_modulate_signature(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    ...


def gated_residual_signature(x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
    ...


def swiglu_signature(ab: Tensor) -> Tensor:
    ...


def _like_x(x, *_, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


define(OpSpec("rmsnorm_modulate", rmsnorm_modulate_signature, outputs=("y",), check=check_rmsnorm_modulate,
              fake=lambda x, weight, shift, scale, eps, out_dtype=None: _like_x(x, out_dtype=out_dtype),
              backends=BACKENDS,
              backward=Backward(saves=("x", "weight", "shift", "scale"), attrs=("eps",),
                                grads=("x", "weight", "shift", "scale"))))
define(OpSpec("gated_residual", gated_residual_signature, outputs=("y",), check=check_gated_residual, fake=_like_x,
              backends=BACKENDS, backward=Backward(saves=("x", "gate", "f"), grads=("x", "gate", "f"))))
define(OpSpec("swiglu", swiglu_signature, outputs=("y",), check=check_swiglu,
              fake=lambda ab: ab.new_empty((*ab.shape[:-1], ab.shape[-1] // 2)),
              backends=BACKENDS, backward=Backward(saves=("ab",), grads=("ab",))))


def rmsnorm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                     out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """rmsnorm(x) * weight * (1 + scale) + shift, computed in float32; x (B,N,D), shift/scale (B,D)."""
    if opspec.plain():
        return _ref.rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype)
    return torch.ops.dip.rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype)


def gated_residual(x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
    """x + gate * f with x, f (B,N,D) and gate (B,D); the result has x's dtype."""
    if opspec.plain():
        return _ref.gated_residual(x, gate, f)
    return torch.ops.dip.gated_residual(x, gate, f)


def swiglu(ab: Tensor) -> Tensor:
    """silu(a) * b with (a, b) the two halves of ab's last dim."""
    if opspec.plain():
        return _ref.swiglu(ab)
    return torch.ops.dip.swiglu(ab)
