"""Attention of a DiP block: per-head qk-RMSNorm, 2D rotary embedding on q and k, then
non-causal scaled dot-product attention. Input is the qkv Linear's output (B, N, 3*H*d), laid out
(3, H, d) along the last dim; output is (B, N, H*d), ready for the output projection."""
import math

import torch
import torch.nn.functional as F


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


def _norm_rope_backward(g, x, w, rope_cos, rope_sin, eps, ct):
    """Gradients (x, w) of norm_rope (see qk_norm_rope) from the gradient g of its output, in ct."""
    xf, wf = x.to(ct), w.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g_e, g_o = g[..., 0::2], g[..., 1::2]
    # the rotation's transpose: (e, o) = (x1 c - x2 s, x1 s + x2 c)
    g_y = torch.stack([g_e * rope_cos + g_o * rope_sin, g_o * rope_cos - g_e * rope_sin], dim=-1).flatten(-2)
    g_w = (g_y * xhat).sum(tuple(range(g_y.dim() - 1)))
    g_xhat = g_y * wf
    g_x = rstd * (g_xhat - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
    return g_x, g_w


def attention_backward(grad_out, qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, lse,
                       num_heads, eps):
    """The forward's derivative written out (softmax attention, then the rotation and the
    RMSNorm; tests check it against autograd of the forward in float64): the attention core in the
    compute dtype with its input gradients rounded to qkv's dtype, as an SDPA backward in that dtype
    returns them, then the norm and rotation in the compute dtype."""
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    ct = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v = (t.to(ct) for t in qk_norm_rope(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps))
    g = grad_out.reshape(b, n, num_heads, d).transpose(1, 2).to(ct)
    scale = 1.0 / math.sqrt(d)
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    g_v = p.transpose(-1, -2) @ g
    g_p = g @ v.transpose(-1, -2)
    g_s = p * (g_p - (g_p * p).sum(-1, keepdim=True))
    g_q = ((g_s @ k) * scale).to(qkv.dtype).to(ct)
    g_k = ((g_s.transpose(-1, -2) @ q) * scale).to(qkv.dtype).to(ct)
    cos, sin = rope_cos.to(ct), rope_sin.to(ct)
    x_q, x_k, _ = qkv.reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    g_xq, g_qw = _norm_rope_backward(g_q, x_q, q_norm_weight, cos, sin, eps, ct)
    g_xk, g_kw = _norm_rope_backward(g_k, x_k, k_norm_weight, cos, sin, eps, ct)
    g_qkv = torch.stack([g_xq, g_xk, g_v.to(qkv.dtype).to(ct)]).permute(1, 3, 0, 2, 4).reshape(b, n, three_hd)
    return g_qkv.to(qkv.dtype), g_qw.to(q_norm_weight.dtype), g_kw.to(k_norm_weight.dtype)
