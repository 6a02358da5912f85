"""Attention of a DiP block: per-head qk-RMSNorm, 2D rotary embedding on q and k, then
non-causal scaled dot-product attention. Input is the qkv Linear's output (B, N, 3*H*d), laid out
(3, H, d) along the last dim; output is (B, N, H*d), ready for the output projection."""
import math

import torch
import torch.nn.functional as F

from ._autograd import grads_by_recompute


def rope_table(grid_h, grid_w, head_dim, device=None, scale=16.0, theta=1e4):
    """cos and sin, each (grid_h*grid_w, head_dim//2) float32. Pair j of a head vector is rotated by
    pos_x*f[j//2] for even j and pos_y*f[j//2] for odd j, f[i] = theta^(-4i/head_dim); positions run
    linearly from 0 to ``scale`` across the grid's columns (x) and rows (y)."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be divisible by 4 for 2D RoPE, got {head_dim}")
    xs = torch.linspace(0, scale, grid_w, dtype=torch.float64, device=device)
    ys = torch.linspace(0, scale, grid_h, dtype=torch.float64, device=device)
    pos_y, pos_x = torch.meshgrid(ys, xs, indexing="ij")
    freqs = theta ** (-torch.arange(0, head_dim // 4, dtype=torch.float64, device=device) * 4 / head_dim)
    ang_x = pos_x.reshape(-1, 1) * freqs
    ang_y = pos_y.reshape(-1, 1) * freqs
    angles = torch.stack([ang_x, ang_y], dim=-1).reshape(grid_h * grid_w, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def qk_norm_rope(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps=1e-6):
    """q, k, v as (B, H, N, d) in qkv's dtype; normalisation and rotation computed in float32
    (float64 for float64 input)."""
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    q, k, v = qkv.reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)

    ct = torch.promote_types(qkv.dtype, torch.float32)
    rope_cos, rope_sin = rope_cos.to(ct), rope_sin.to(ct)

    def norm_rope(x, w):
        xf = x.to(ct)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(ct)
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * rope_cos - x2 * rope_sin, x1 * rope_sin + x2 * rope_cos], dim=-1)
        return out.flatten(-2).to(qkv.dtype)

    return norm_rope(q, q_norm_weight), norm_rope(k, k_norm_weight), v


def attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps=1e-6):
    q, k, v = qk_norm_rope(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def attention_lse(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps=1e-6):
    """Log-sum-exp of each query's scaled scores, (B, H, N) float32 (natural log)."""
    q, k, _ = qk_norm_rope(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)
    ct = torch.promote_types(qkv.dtype, torch.float32)
    scores = (q.to(ct) @ k.to(ct).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.logsumexp(scores, dim=-1).float()


def attention_forward(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps):
    args = (qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)
    return attention(*args), attention_lse(*args)


def attention_backward(grad_out, qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, lse,
                       num_heads, eps):
    def fn(qkv, qw, kw):
        return attention(qkv, qw, kw, rope_cos, rope_sin, num_heads, eps)
    g_qkv, g_qw, g_kw = grads_by_recompute(fn, [qkv, q_norm_weight, k_norm_weight], grad_out)
    return g_qkv, g_qw, g_kw
