"""attention: per-head qk-RMSNorm + 2D RoPE + non-causal attention, from the qkv projection's output.

qkv (B, N, 3*H*d) laid out (3, H, d) on the last dim -> out (B, N, H*d) in qkv's dtype and lse
(B, H, N) float32 (natural log, the backward's statistic: not differentiable)."""
from typing import Tuple

import torch
from torch import Tensor

from .. import opspec
from ..opspec import Backward, OpSpec, define
from ..reference import attention as _ref
from . import checks


def check_attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps=None):
    checks.tensor("qkv", qkv, rank=3)
    b, n, three_hd = qkv.shape
    checks.positive_int("num_heads", num_heads)
    if three_hd % (3 * num_heads):
        raise ValueError(f"qkv last dim must be 3*num_heads*head_dim with num_heads={num_heads}, got {three_hd}")
    d = three_hd // (3 * num_heads)
    if d % 4:
        raise ValueError(f"head_dim must be divisible by 4 for 2D RoPE, got {d}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        checks.tensor(name, w, rank=1)
        checks.same(name, w, "qkv", qkv, dtype=False)
        checks.shape(name, w, (d,))
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        checks.tensor(name, t, rank=2, dtypes=(torch.float32,))
        checks.same(name, t, "qkv", qkv, dtype=False)
        checks.shape(name, t, (n, d // 2))


def attention_signature(qkv: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor, rope_cos: Tensor, rope_sin: Tensor,
               num_heads: int, eps: float) -> Tuple[Tensor, Tensor]:
    ...


def _fake(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps):
    b, n, three_hd = qkv.shape
    return qkv.new_empty((b, n, three_hd // 3)), qkv.new_empty((b, num_heads, n), dtype=torch.float32)


define(OpSpec(
    "attention", attention_signature, outputs=("out", "lse"), check=check_attention, fake=_fake, dispatch=3,
    backends={"triton": "dip_kernels.triton.attention", "reference": "dip_kernels.reference.attention"},
    backward=Backward(saves=("qkv", "q_norm_weight", "k_norm_weight", "rope_cos", "rope_sin", "out", "lse"),
                      attrs=("num_heads", "eps"), grads=("qkv", "q_norm_weight", "k_norm_weight"),
                      grad_outputs=("out",))))


def attention(qkv: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor, rope_cos: Tensor, rope_sin: Tensor,
              num_heads: int, eps: float = 1e-6) -> Tensor:
    """qk-RMSNorm + 2D RoPE + attention on the qkv Linear's output (B, N, 3*H*d) -> (B, N, H*d)."""
    if opspec.plain():
        return _ref.attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)
    return torch.ops.dip.attention(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps)[0]
