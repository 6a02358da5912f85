"""The ``torch.ops.dip.*`` custom ops: schema, input checks, fake (meta) implementations and
autograd. Each op runs the backend chosen in dip_kernels.backends; the eager reference is the
ground truth. The public functions at the bottom are what the model calls.

Every input check runs in both the real and the fake implementation, so bad input raises a
ValueError naming the argument before any kernel runs, in eager mode and under torch.compile.
"""
import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .reference import attention as _ref_attention, elementwise as _ref_elementwise
from .reference import patch_detailer as _ref_head, patchify as _ref_patchify
from .reference.patch_detailer import head_weight_shapes, HEAD_WEIGHT_NAMES

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------- input checks
def _check_tensor(name, t, rank=None, dtypes=_FLOAT_DTYPES):
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_same(name, t, ref_name, ref, dtype=True):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _check_shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_patch_size(patch_size):
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")


def check_patchify(images, patch_size):
    _check_tensor("images", images, rank=4)
    _check_patch_size(patch_size)
    _, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images height and width must be divisible by patch_size={patch_size}, got (H, W)=({h}, {w})")


def check_unpatchify(tokens, patch_size, height, width):
    _check_tensor("tokens", tokens, rank=3)
    _check_patch_size(patch_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"height and width must be divisible by patch_size={patch_size}, got ({height}, {width})")
    n_expected = (height // patch_size) * (width // patch_size)
    if tokens.shape[1] != n_expected:
        raise ValueError(f"tokens must have {n_expected} tokens for a {height}x{width} image with patch_size="
                         f"{patch_size}, got shape {tuple(tokens.shape)}")
    if tokens.shape[2] % (patch_size * patch_size):
        raise ValueError(f"tokens last dim must be channels*{patch_size}*{patch_size}, got {tokens.shape[2]}")


def check_attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads):
    _check_tensor("qkv", qkv, rank=3, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    b, n, three_hd = qkv.shape
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if three_hd % (3 * num_heads):
        raise ValueError(f"qkv last dim must be 3*num_heads*head_dim with num_heads={num_heads}, got {three_hd}")
    d = three_hd // (3 * num_heads)
    if d % 4:
        raise ValueError(f"head_dim must be divisible by 4 for 2D RoPE, got {d}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        _check_tensor(name, w, rank=1)
        _check_same(name, w, "qkv", qkv, dtype=False)
        _check_shape(name, w, (d,))
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        _check_tensor(name, t, rank=2, dtypes=(torch.float32,))
        _check_same(name, t, "qkv", qkv, dtype=False)
        _check_shape(name, t, (n, d // 2))


def check_patch_detailer(patches, tokens, weights):
    _check_tensor("patches", patches, rank=4, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    m, c, p, p2 = patches.shape
    if c != 3:
        raise ValueError(f"patches must have 3 channels, shape (M, 3, P, P), got {tuple(patches.shape)}")
    if p != p2 or p not in (16, 32):
        raise ValueError(f"patches must be (M, 3, P, P) with P in (16, 32), got {tuple(patches.shape)}")
    _check_tensor("tokens", tokens, rank=2)
    _check_same("tokens", tokens, "patches", patches)
    if tokens.shape[0] != m:
        raise ValueError(f"tokens must have one row per patch, shape ({m}, D), got {tuple(tokens.shape)}")
    if len(weights) != len(HEAD_WEIGHT_NAMES):
        raise ValueError(f"weights must hold the {len(HEAD_WEIGHT_NAMES)} head tensors {HEAD_WEIGHT_NAMES}, "
                         f"got {len(weights)}")
    for name, w, shape in zip(HEAD_WEIGHT_NAMES, weights, head_weight_shapes(tokens.shape[1])):
        _check_tensor(f"weights[{name}]", w)
        _check_same(f"weights[{name}]", w, "patches", patches)
        _check_shape(f"weights[{name}]", w, shape)
        if not w.is_contiguous():
            raise ValueError(f"weights[{name}] must be contiguous")


def check_rmsnorm_modulate(x, weight, shift, scale):
    _check_tensor("x", x, rank=3)
    b, _, d = x.shape
    _check_tensor("weight", weight, rank=1)
    _check_same("weight", weight, "x", x, dtype=False)
    _check_shape("weight", weight, (d,))
    for name, t in (("shift", shift), ("scale", scale)):
        _check_tensor(name, t, rank=2)
        _check_same(name, t, "x", x)
        _check_shape(name, t, (b, d))


def check_gated_residual(x, gate, f):
    _check_tensor("x", x, rank=3)
    _check_tensor("gate", gate, rank=2)
    _check_same("gate", gate, "x", x)
    _check_shape("gate", gate, (x.shape[0], x.shape[2]))
    _check_tensor("f", f, rank=3)
    _check_same("f", f, "x", x, dtype=False)
    _check_shape("f", f, x.shape)


def check_swiglu(ab):
    _check_tensor("ab", ab)
    if ab.dim() < 1 or ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dim (the two halves a, b), got shape {tuple(ab.shape)}")


# ---------------------------------------------------------------- helpers
def _impl(op, *inputs):
    """The backend module running custom op ``op``; ``inputs`` are the forward op's leading inputs
    (for a backward op too), from which the backend is chosen and recorded."""
    return backends.implementation(op, *inputs)


def _fresh(outputs, inputs):
    """Custom-op outputs may not alias inputs: clone any output that shares an input's storage."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}

    def fix(t):
        if isinstance(t, Tensor) and t.numel() and t.untyped_storage().data_ptr() in ptrs:
            return t.clone()
        return t
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(fix(t) if not isinstance(t, list) else [fix(u) for u in t] for t in outputs)
    return fix(outputs)


# ---------------------------------------------------------------- patchify / unpatchify
@torch.library.custom_op("dip::patchify", mutates_args=())
def _patchify(images: Tensor, patch_size: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    check_patchify(images, patch_size)
    return _fresh(_impl("patchify", images).patchify_forward(images, patch_size, out_dtype), [images])


@_patchify.register_fake
def _(images, patch_size, out_dtype=None):
    check_patchify(images, patch_size)
    b, c, h, w = images.shape
    n = (h // patch_size) * (w // patch_size)
    return images.new_empty((b, n, c * patch_size * patch_size), dtype=out_dtype or images.dtype)


@torch.library.custom_op("dip::unpatchify", mutates_args=())
def _unpatchify(tokens: Tensor, patch_size: int, height: int, width: int,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    check_unpatchify(tokens, patch_size, height, width)
    out = _impl("unpatchify", tokens).unpatchify_forward(tokens, patch_size, height, width, out_dtype)
    return _fresh(out, [tokens])


@_unpatchify.register_fake
def _(tokens, patch_size, height, width, out_dtype=None):
    check_unpatchify(tokens, patch_size, height, width)
    c = tokens.shape[2] // (patch_size * patch_size)
    return tokens.new_empty((tokens.shape[0], c, height, width), dtype=out_dtype or tokens.dtype)


def _patchify_setup(ctx, inputs, output):
    images, patch_size, _ = inputs
    ctx.patch_size, ctx.hw, ctx.dtype = patch_size, images.shape[2:], images.dtype


def _patchify_backward(ctx, grad):
    return torch.ops.dip.unpatchify(grad, ctx.patch_size, ctx.hw[0], ctx.hw[1], ctx.dtype), None, None


def _unpatchify_setup(ctx, inputs, output):
    tokens, patch_size, _, _, _ = inputs
    ctx.patch_size, ctx.dtype = patch_size, tokens.dtype


def _unpatchify_backward(ctx, grad):
    return torch.ops.dip.patchify(grad, ctx.patch_size, ctx.dtype), None, None, None, None


_patchify.register_autograd(_patchify_backward, setup_context=_patchify_setup)
_unpatchify.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


# ---------------------------------------------------------------- attention
@torch.library.custom_op("dip::attention", mutates_args=())
def _attention(qkv: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor, rope_cos: Tensor, rope_sin: Tensor,
               num_heads: int, eps: float) -> Tuple[Tensor, Tensor]:
    check_attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads)
    out, lse = _impl("attention", qkv, q_norm_weight, k_norm_weight).attention_forward(
        qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)
    return _fresh((out, lse), [qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin])


@_attention.register_fake
def _(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps):
    check_attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads)
    b, n, three_hd = qkv.shape
    return (qkv.new_empty((b, n, three_hd // 3)),
            qkv.new_empty((b, num_heads, n), dtype=torch.float32))


@torch.library.custom_op("dip::attention_backward", mutates_args=())
def _attention_backward(grad_out: Tensor, qkv: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor,
                        rope_cos: Tensor, rope_sin: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                        eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    inputs = [grad_out, qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, lse]
    impl = _impl("attention_backward", qkv, q_norm_weight, k_norm_weight)
    grads = impl.attention_backward(*inputs, num_heads, eps)
    return _fresh(tuple(grads), inputs)


@_attention_backward.register_fake
def _(grad_out, qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, lse, num_heads, eps):
    return torch.empty_like(qkv), torch.empty_like(q_norm_weight), torch.empty_like(k_norm_weight)


def _attention_setup(ctx, inputs, output):
    qkv, qw, kw, cos, sin, num_heads, eps = inputs
    out, lse = output
    ctx.save_for_backward(qkv, qw, kw, cos, sin, out, lse)
    ctx.num_heads, ctx.eps = num_heads, eps
    ctx.mark_non_differentiable(lse)


def _attention_bwd(ctx, grad_out, _grad_lse):
    qkv, qw, kw, cos, sin, out, lse = ctx.saved_tensors
    g_qkv, g_qw, g_kw = torch.ops.dip.attention_backward(
        grad_out.contiguous(), qkv, qw, kw, cos, sin, out, lse, ctx.num_heads, ctx.eps)
    return g_qkv, g_qw, g_kw, None, None, None, None


_attention.register_autograd(_attention_bwd, setup_context=_attention_setup)


# ---------------------------------------------------------------- patch detailer head
@torch.library.custom_op("dip::patch_detailer", mutates_args=())
def _patch_detailer(patches: Tensor, tokens: Tensor, weights: List[Tensor]) -> Tensor:
    check_patch_detailer(patches, tokens, weights)
    out = _impl("patch_detailer", patches, tokens, weights).patch_detailer_forward(patches, tokens, weights)
    return _fresh(out, [patches, tokens, *weights])


@_patch_detailer.register_fake
def _(patches, tokens, weights):
    check_patch_detailer(patches, tokens, weights)
    return torch.empty_like(patches, memory_format=torch.contiguous_format)


@torch.library.custom_op("dip::patch_detailer_backward", mutates_args=())
def _patch_detailer_backward(grad_out: Tensor, patches: Tensor, tokens: Tensor,
                             weights: List[Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
    g_p, g_t, g_w = _impl("patch_detailer_backward", patches, tokens, weights).patch_detailer_backward(
        grad_out, patches, tokens, weights)
    inputs = [grad_out, patches, tokens, *weights]
    return _fresh(g_p, inputs), _fresh(g_t, inputs), [_fresh(g, inputs) for g in g_w]


@_patch_detailer_backward.register_fake
def _(grad_out, patches, tokens, weights):
    return torch.empty_like(patches), torch.empty_like(tokens), [torch.empty_like(w) for w in weights]


def _patch_detailer_setup(ctx, inputs, output):
    patches, tokens, weights = inputs
    ctx.save_for_backward(patches, tokens, *weights)


def _patch_detailer_bwd(ctx, grad_out):
    patches, tokens, *weights = ctx.saved_tensors
    g_p, g_t, g_w = torch.ops.dip.patch_detailer_backward(grad_out.contiguous(), patches, tokens, weights)
    return g_p, g_t, list(g_w)


_patch_detailer.register_autograd(_patch_detailer_bwd, setup_context=_patch_detailer_setup)


# ---------------------------------------------------------------- fused elementwise
@torch.library.custom_op("dip::rmsnorm_modulate", mutates_args=())
def _rmsnorm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    check_rmsnorm_modulate(x, weight, shift, scale)
    y = _impl("rmsnorm_modulate", x).rmsnorm_modulate_forward(x, weight, shift, scale, eps, out_dtype)
    return _fresh(y, [x, weight, shift, scale])


@_rmsnorm_modulate.register_fake
def _(x, weight, shift, scale, eps, out_dtype=None):
    check_rmsnorm_modulate(x, weight, shift, scale)
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("dip::rmsnorm_modulate_backward", mutates_args=())
def _rmsnorm_modulate_backward(grad_y: Tensor, x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor,
                               eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    inputs = [grad_y, x, weight, shift, scale]
    grads = _impl("rmsnorm_modulate_backward", x).rmsnorm_modulate_backward(*inputs, eps)
    return _fresh(tuple(grads), inputs)


@_rmsnorm_modulate_backward.register_fake
def _(grad_y, x, weight, shift, scale, eps):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, weight, shift, scale))


def _rmsnorm_modulate_setup(ctx, inputs, output):
    x, weight, shift, scale, eps, _ = inputs
    ctx.save_for_backward(x, weight, shift, scale)
    ctx.eps = eps


def _rmsnorm_modulate_bwd(ctx, grad_y):
    grads = torch.ops.dip.rmsnorm_modulate_backward(grad_y.contiguous(), *ctx.saved_tensors, ctx.eps)
    return (*grads, None, None)


_rmsnorm_modulate.register_autograd(_rmsnorm_modulate_bwd, setup_context=_rmsnorm_modulate_setup)


@torch.library.custom_op("dip::gated_residual", mutates_args=())
def _gated_residual(x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
    check_gated_residual(x, gate, f)
    return _fresh(_impl("gated_residual", x).gated_residual_forward(x, gate, f), [x, gate, f])


@_gated_residual.register_fake
def _(x, gate, f):
    check_gated_residual(x, gate, f)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dip::gated_residual_backward", mutates_args=())
def _gated_residual_backward(grad_y: Tensor, x: Tensor, gate: Tensor, f: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    inputs = [grad_y, x, gate, f]
    return _fresh(tuple(_impl("gated_residual_backward", x).gated_residual_backward(*inputs)), inputs)


@_gated_residual_backward.register_fake
def _(grad_y, x, gate, f):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, gate, f))


def _gated_residual_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gated_residual_bwd(ctx, grad_y):
    return torch.ops.dip.gated_residual_backward(grad_y.contiguous(), *ctx.saved_tensors)


_gated_residual.register_autograd(_gated_residual_bwd, setup_context=_gated_residual_setup)


@torch.library.custom_op("dip::swiglu", mutates_args=())
def _swiglu(ab: Tensor) -> Tensor:
    check_swiglu(ab)
    return _fresh(_impl("swiglu", ab).swiglu_forward(ab), [ab])


@_swiglu.register_fake
def _(ab):
    check_swiglu(ab)
    return ab.new_empty((*ab.shape[:-1], ab.shape[-1] // 2))


@torch.library.custom_op("dip::swiglu_backward", mutates_args=())
def _swiglu_backward(grad_y: Tensor, ab: Tensor) -> Tensor:
    return _fresh(_impl("swiglu_backward", ab).swiglu_backward(grad_y, ab), [grad_y, ab])


@_swiglu_backward.register_fake
def _(grad_y, ab):
    return torch.empty_like(ab, memory_format=torch.contiguous_format)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_bwd(ctx, grad_y):
    return torch.ops.dip.swiglu_backward(grad_y.contiguous(), *ctx.saved_tensors)


_swiglu.register_autograd(_swiglu_bwd, setup_context=_swiglu_setup)


# ---------------------------------------------------------------- public API
_plain = False


@contextlib.contextmanager
def plain_reference(enabled: bool = True):
    """Inside this block the public functions below call the eager reference functions directly,
    with plain autograd and no custom ops: the model becomes exactly what a user without this
    library would run (and what torch.compile of it would see). The benchmarks' eager and compile
    baselines; not a backend, since it bypasses the ops' checks, schema and saved statistics."""
    global _plain
    old, _plain = _plain, enabled
    try:
        yield
    finally:
        _plain = old


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``device`` when autocast is on there, else None."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def patchify(images: Tensor, patch_size: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """(B, C, H, W) -> (B, N, C*P*P) tokens; ``.view(B*N, C, P, P)`` gives the head's patch layout."""
    if _plain:
        return _ref_patchify.patchify(images, patch_size, out_dtype)
    return torch.ops.dip.patchify(images, patch_size, out_dtype)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """(B, N, C*P*P) tokens -> (B, C, H, W) images."""
    if _plain:
        return _ref_patchify.unpatchify(tokens, patch_size, height, width, out_dtype)
    return torch.ops.dip.unpatchify(tokens, patch_size, height, width, out_dtype)


def attention(qkv: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor, rope_cos: Tensor, rope_sin: Tensor,
              num_heads: int, eps: float = 1e-6) -> Tensor:
    """qk-RMSNorm + 2D RoPE + attention on the qkv Linear's output (B, N, 3*H*d) -> (B, N, H*d)."""
    if _plain:
        return _ref_attention.attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)
    return torch.ops.dip.attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)[0]


def patch_detailer(patches: Tensor, tokens: Tensor, weights: List[Tensor]) -> Tensor:
    """The whole Patch Detailer Head on (M, 3, P, P) patches and (M, D) tokens. Under autocast every
    input is cast to the autocast dtype (the head is all convolutions)."""
    if _plain:
        return _ref_head.patch_detailer(patches, tokens, list(weights))
    dtype = autocast_dtype(patches.device)
    if dtype is not None:
        patches, tokens = patches.to(dtype), tokens.to(dtype)
        weights = [w.to(dtype) for w in weights]
    elif tokens.dtype != patches.dtype:
        raise ValueError(f"tokens has dtype {tokens.dtype} but patches has {patches.dtype}; they must match")
    return torch.ops.dip.patch_detailer(patches, tokens, list(weights))


def rmsnorm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                     out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """rmsnorm(x) * weight * (1 + scale) + shift, computed in float32; x (B,N,D), shift/scale (B,D)."""
    if _plain:
        return _ref_elementwise.rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype)
    return torch.ops.dip.rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype)


def gated_residual(x: Tensor, gate: Tensor, f: Tensor) -> Tensor:
    """x + gate * f with x, f (B,N,D) and gate (B,D); the result has x's dtype."""
    if _plain:
        return _ref_elementwise.gated_residual(x, gate, f)
    return torch.ops.dip.gated_residual(x, gate, f)


def swiglu(ab: Tensor) -> Tensor:
    """silu(a) * b with (a, b) the two halves of ab's last dim."""
    if _plain:
        return _ref_elementwise.swiglu(ab)
    return torch.ops.dip.swiglu(ab)
