"""Triton flash attention fused with DiP's per-head qk-RMSNorm and 2D RoPE.

q and k are normalised and rotated in registers as they are loaded (the forward prologue for q,
each key block for k), so the normalised/rotated tensors never go through memory. A head vector
is loaded as its even and odd halves (two strided loads of d/2 elements), which makes the
rotation elementwise; the scores are the sum of two dots, even.even + odd.odd. Head dims that are
not powers of two (72 in DiP-XL/16) run natively: the halves are padded to a power of two in
registers only, under a mask.

Backward is FA2 style and deterministic (no atomics): a dq kernel (which also writes
delta = rowsum(dO * O) for its rows) loops over key blocks, then a dk/dv kernel loops over query
blocks. Each one finishes with the chain rule through the rotation and the RMSNorm and writes its
slot of g_qkv; the norm-weight gradients are per-program partial sums reduced by torch.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from . import capability, triton_interpreted
from .._alloc import output_buffer
from .launch import launch

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- shared pieces
@triton.jit
def _load_normed(head_ptr, rows, row_mask, stride_n, stride_c, half, half_mask, eps, D: tl.constexpr):
    """Rows ``rows`` of one head's q or k, RMS-normalised (fp32, before the weight): the even and
    odd halves and the rstd per row. Masked rows and padded columns are zero."""
    mask = row_mask[:, None] & half_mask[None, :]
    even_ptr = head_ptr + rows[:, None] * stride_n + (2 * half)[None, :] * stride_c
    x_e = tl.load(even_ptr, mask=mask, other=0.0).to(tl.float32)
    x_o = tl.load(even_ptr + stride_c, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x_e * x_e, 1) + tl.sum(x_o * x_o, 1)) / D + eps)
    return x_e * rstd[:, None], x_o * rstd[:, None], rstd


@triton.jit
def _load_norm_rope(head_ptr, rows, row_mask, stride_n, stride_c, cos_ptr, sin_ptr, w_ptr, half, half_mask,
                    eps, D: tl.constexpr, HALF: tl.constexpr):
    """Rows ``rows`` of one head's q or k: RMSNorm (fp32, with weight) then RoPE; the rotated even
    and odd halves, fp32. (Only what the caller keeps is returned: a name a kernel binds before its
    key loop and again inside it, even ``_``, is loop-carried and must keep its shape.)"""
    xh_e, xh_o, rstd = _load_normed(head_ptr, rows, row_mask, stride_n, stride_c, half, half_mask, eps, D)
    mask = row_mask[:, None] & half_mask[None, :]
    w_e = tl.load(w_ptr + 2 * half, mask=half_mask, other=0.0).to(tl.float32)
    w_o = tl.load(w_ptr + 2 * half + 1, mask=half_mask, other=0.0).to(tl.float32)
    a_e = xh_e * w_e[None, :]
    a_o = xh_o * w_o[None, :]
    table = rows[:, None] * HALF + half[None, :]
    c = tl.load(cos_ptr + table, mask=mask, other=0.0)
    s = tl.load(sin_ptr + table, mask=mask, other=0.0)
    return a_e * c - a_o * s, a_e * s + a_o * c


@triton.jit
def _norm_rope_backward(dy_e, dy_o, xh_e, xh_o, rstd, rows, row_mask, cos_ptr, sin_ptr, w_ptr, half, half_mask,
                        D: tl.constexpr, HALF: tl.constexpr):
    """Gradient through RoPE (the inverse rotation) and RMSNorm for a tile of rows; returns the
    input-gradient halves and this tile's weight-gradient halves (summed over its rows)."""
    mask = row_mask[:, None] & half_mask[None, :]
    table = rows[:, None] * HALF + half[None, :]
    c = tl.load(cos_ptr + table, mask=mask, other=0.0)
    s = tl.load(sin_ptr + table, mask=mask, other=0.0)
    da_e = dy_e * c + dy_o * s
    da_o = dy_o * c - dy_e * s
    w_e = tl.load(w_ptr + 2 * half, mask=half_mask, other=0.0).to(tl.float32)
    w_o = tl.load(w_ptr + 2 * half + 1, mask=half_mask, other=0.0).to(tl.float32)
    dxh_e = da_e * w_e[None, :]
    dxh_o = da_o * w_o[None, :]
    mean = (tl.sum(xh_e * dxh_e, 1) + tl.sum(xh_o * dxh_o, 1)) / D
    dx_e = rstd[:, None] * (dxh_e - xh_e * mean[:, None])
    dx_o = rstd[:, None] * (dxh_o - xh_o * mean[:, None])
    # masked rows have xh == 0, so they add nothing to the weight gradient
    return dx_e, dx_o, tl.sum(xh_e * da_e, 0), tl.sum(xh_o * da_o, 0)


@triton.jit
def _head_pointers(qkv_ptr, pid_bh, H, stride_qkv_b, stride_qkv_c, D: tl.constexpr):
    """This program's batch and head, and that head's q, k, v starts in qkv's (3, H, d) last dim."""
    b = pid_bh // H
    h = pid_bh % H
    base = qkv_ptr + b.to(tl.int64) * stride_qkv_b
    q_ptr = base + (h * D) * stride_qkv_c
    k_ptr = base + ((H + h) * D) * stride_qkv_c
    v_ptr = base + ((2 * H + h) * D) * stride_qkv_c
    return b, h, q_ptr, k_ptr, v_ptr


@triton.jit
def _store_halves(head_ptr, rows, row_mask, stride_n, stride_c, y_e, y_o, half, half_mask):
    mask = row_mask[:, None] & half_mask[None, :]
    even_ptr = head_ptr + rows[:, None] * stride_n + (2 * half)[None, :] * stride_c
    dtype = head_ptr.dtype.element_ty
    tl.store(even_ptr, y_e.to(dtype), mask=mask)
    tl.store(even_ptr + stride_c, y_o.to(dtype), mask=mask)


# ---------------------------------------------------------------- forward
# H needs no specialisation (head offsets are multiples of the constexpr D): 2 heads and 16 share binaries
@triton.jit(do_not_specialize=["H"])
def _attention_fwd_kernel(
        qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, out_ptr, lse_ptr,
        N, H, stride_qkv_b, stride_qkv_n, stride_qkv_c, stride_out_b, stride_out_n,
        eps, qk_scale,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, pid_bh, H, stride_qkv_b, stride_qkv_c, D)
    dtype = qkv_ptr.dtype.element_ty

    half = tl.arange(0, BLOCK_HALF)
    half_mask = half < HALF
    dcol = tl.arange(0, BLOCK_D)
    d_mask = dcol < D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N

    q_e, q_o = _load_norm_rope(q_ptr, rows, row_mask, stride_qkv_n, stride_qkv_c, cos_ptr, sin_ptr,
                                        qw_ptr, half, half_mask, eps, D, HALF)
    # the reference rounds the normed, rotated q and k to the input dtype before its matmuls
    q_e = q_e.to(dtype)
    q_o = q_o.to(dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k_e, k_o = _load_norm_rope(k_ptr, cols, col_mask, stride_qkv_n, stride_qkv_c, cos_ptr, sin_ptr,
                                            kw_ptr, half, half_mask, eps, D, HALF)
        s = tl.dot(q_e, tl.trans(k_e.to(dtype)), input_precision=DOT_PRECISION)
        s = tl.dot(q_o, tl.trans(k_o.to(dtype)), acc=s, input_precision=DOT_PRECISION)
        s = s * qk_scale  # log2 domain
        if not EVEN_N:
            s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + cols[:, None] * stride_qkv_n + dcol[None, :] * stride_qkv_c,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), v, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_rows = out_ptr + b.to(tl.int64) * stride_out_b + rows[:, None] * stride_out_n
    tl.store(out_rows + h * D + dcol[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453,  # * ln 2
             mask=row_mask)


# ---------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["H"])
def _attention_bwd_dq_kernel(
        qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, gqkv_ptr, gqw_part_ptr,
        N, H, stride_qkv_b, stride_qkv_n, stride_qkv_c, stride_o_b, stride_o_n, stride_do_b, stride_do_n,
        stride_g_b, stride_g_n, eps, qk_scale, sm_scale,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, pid_bh, H, stride_qkv_b, stride_qkv_c, D)
    dtype = qkv_ptr.dtype.element_ty

    half = tl.arange(0, BLOCK_HALF)
    half_mask = half < HALF
    dcol = tl.arange(0, BLOCK_D)
    d_mask = dcol < D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tile_mask = row_mask[:, None] & d_mask[None, :]

    q_e, q_o = _load_norm_rope(q_ptr, rows, row_mask, stride_qkv_n, stride_qkv_c, cos_ptr, sin_ptr,
                                        qw_ptr, half, half_mask, eps, D, HALF)
    q_e = q_e.to(dtype)
    q_o = q_o.to(dtype)
    do = tl.load(dout_ptr + b.to(tl.int64) * stride_do_b + rows[:, None] * stride_do_n + h * D + dcol[None, :],
                 mask=tile_mask, other=0.0)
    o = tl.load(out_ptr + b.to(tl.int64) * stride_o_b + rows[:, None] * stride_o_n + h * D + dcol[None, :],
                mask=tile_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_offset = pid_bh.to(tl.int64) * N + rows
    tl.store(delta_ptr + stat_offset, delta, mask=row_mask)
    # padded query rows get lse = +inf, hence p = 0
    lse2 = tl.load(lse_ptr + stat_offset, mask=row_mask, other=float("inf")) * 1.4426950408889634
    do = do.to(dtype)

    dq_e = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    dq_o = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        # padded key rows load as k = v = 0: their ds multiplies k = 0, so they add nothing to dq
        k_e, k_o = _load_norm_rope(k_ptr, cols, col_mask, stride_qkv_n, stride_qkv_c, cos_ptr, sin_ptr,
                                            kw_ptr, half, half_mask, eps, D, HALF)
        k_e = k_e.to(dtype)
        k_o = k_o.to(dtype)
        v = tl.load(v_ptr + cols[:, None] * stride_qkv_n + dcol[None, :] * stride_qkv_c,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q_e, tl.trans(k_e), input_precision=DOT_PRECISION)
        s = tl.dot(q_o, tl.trans(k_o), acc=s, input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq_e = tl.dot(ds, k_e, acc=dq_e, input_precision=DOT_PRECISION)
        dq_o = tl.dot(ds, k_o, acc=dq_o, input_precision=DOT_PRECISION)

    # the normalised q is reloaded rather than kept live through the loop, to spare registers
    qh_e, qh_o, q_rstd = _load_normed(q_ptr, rows, row_mask, stride_qkv_n, stride_qkv_c, half, half_mask, eps, D)
    dx_e, dx_o, dw_e, dw_o = _norm_rope_backward(dq_e * sm_scale, dq_o * sm_scale, qh_e, qh_o, q_rstd, rows,
                                                 row_mask, cos_ptr, sin_ptr, qw_ptr, half, half_mask, D, HALF)
    gq_ptr = gqkv_ptr + b.to(tl.int64) * stride_g_b + h * D
    _store_halves(gq_ptr, rows, row_mask, stride_g_n, 1, dx_e, dx_o, half, half_mask)
    part = gqw_part_ptr + (pid_bh * tl.num_programs(0) + pid_m).to(tl.int64) * D
    tl.store(part + 2 * half, dw_e, mask=half_mask)
    tl.store(part + 2 * half + 1, dw_o, mask=half_mask)


@triton.jit(do_not_specialize=["H"])
def _attention_bwd_dkdv_kernel(
        qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, dout_ptr, lse_ptr, delta_ptr, gqkv_ptr, gkw_part_ptr,
        N, H, stride_qkv_b, stride_qkv_n, stride_qkv_c, stride_do_b, stride_do_n, stride_g_b, stride_g_n,
        eps, qk_scale, sm_scale,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, pid_bh, H, stride_qkv_b, stride_qkv_c, D)
    dtype = qkv_ptr.dtype.element_ty

    half = tl.arange(0, BLOCK_HALF)
    half_mask = half < HALF
    dcol = tl.arange(0, BLOCK_D)
    d_mask = dcol < D
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    k_e, k_o = _load_norm_rope(k_ptr, cols, col_mask, stride_qkv_n, stride_qkv_c, cos_ptr, sin_ptr,
                                        kw_ptr, half, half_mask, eps, D, HALF)
    k_e = k_e.to(dtype)
    k_o = k_o.to(dtype)
    v = tl.load(v_ptr + cols[:, None] * stride_qkv_n + dcol[None, :] * stride_qkv_c,
                mask=col_mask[:, None] & d_mask[None, :], other=0.0)

    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk_e = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    dk_o = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    do_base = dout_ptr + b.to(tl.int64) * stride_do_b + h * D
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        q_e, q_o = _load_norm_rope(q_ptr, rows, row_mask, stride_qkv_n, stride_qkv_c, cos_ptr, sin_ptr,
                                            qw_ptr, half, half_mask, eps, D, HALF)
        q_e = q_e.to(dtype)
        q_o = q_o.to(dtype)
        do = tl.load(do_base + rows[:, None] * stride_do_n + dcol[None, :],
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(dtype)
        stat_offset = pid_bh.to(tl.int64) * N + rows
        # padded query rows: lse = +inf gives p = 0, delta = 0 keeps ds finite
        lse2 = tl.load(lse_ptr + stat_offset, mask=row_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + stat_offset, mask=row_mask, other=0.0)
        # transposed scores (keys x queries), so the accumulators need no transposes
        s_t = tl.dot(k_e, tl.trans(q_e), input_precision=DOT_PRECISION)
        s_t = tl.dot(k_o, tl.trans(q_o), acc=s_t, input_precision=DOT_PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        dv = tl.dot(p_t.to(dtype), do, acc=dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        dk_e = tl.dot(ds_t, q_e, acc=dk_e, input_precision=DOT_PRECISION)
        dk_o = tl.dot(ds_t, q_o, acc=dk_o, input_precision=DOT_PRECISION)

    g_base = gqkv_ptr + b.to(tl.int64) * stride_g_b
    tl.store(g_base + cols[:, None] * stride_g_n + (2 * H + h) * D + dcol[None, :],
             dv.to(gqkv_ptr.dtype.element_ty), mask=col_mask[:, None] & d_mask[None, :])
    kh_e, kh_o, k_rstd = _load_normed(k_ptr, cols, col_mask, stride_qkv_n, stride_qkv_c, half, half_mask, eps, D)
    dx_e, dx_o, dw_e, dw_o = _norm_rope_backward(dk_e * sm_scale, dk_o * sm_scale, kh_e, kh_o, k_rstd, cols,
                                                 col_mask, cos_ptr, sin_ptr, kw_ptr, half, half_mask, D, HALF)
    _store_halves(g_base + (H + h) * D, cols, col_mask, stride_g_n, 1, dx_e, dx_o, half, half_mask)
    part = gkw_part_ptr + (pid_bh * tl.num_programs(0) + pid_n).to(tl.int64) * D
    tl.store(part + 2 * half, dw_e, mask=half_mask)
    tl.store(part + 2 * half + 1, dw_o, mask=half_mask)


# ---------------------------------------------------------------- launch configuration
def _configs(gpu_choices, interpreter_choice):
    """Autotuning candidates on a GPU; one fixed config under the interpreter (no autotuning there)."""
    choices = [interpreter_choice] if triton_interpreted() else gpu_choices
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in choices]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M tiles queries and BLOCK_N keys in every kernel.
# On a GPU: the configs that compile for sm_90 and sm_80 with triton 3.6 and 3.8 at head dim 72 in
# bf16 without a byte of spills and within both shared-memory limits (python -m
# dip_kernels.precompile; bench/results/precompile_*), two per kernel so the autotuner has a choice
# and a first run compiles six binaries. Each kernel keeps a config with BLOCK_M != BLOCK_N, which a
# loop-carried value of the wrong tile shape fails to compile (tests/test_precompile.py). Under the
# interpreter the tiles differ per kernel so the tests cover uneven tilings and tails.
_FWD_CONFIGS = _configs([(128, 32, 8, 2), (64, 64, 8, 2)], (64, 32, 4, 1))
_DQ_CONFIGS = _configs([(32, 64, 8, 2), (32, 32, 4, 2)], (64, 32, 4, 1))
_DKDV_CONFIGS = _configs([(64, 32, 8, 2), (32, 32, 4, 2)], (32, 64, 4, 1))

_fwd = triton.autotune(_FWD_CONFIGS, key=["N", "D"])(
    triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})(_attention_fwd_kernel))
_bwd_dq = triton.autotune(_DQ_CONFIGS, key=["N", "D"])(_attention_bwd_dq_kernel)
_bwd_dkdv = triton.autotune(_DKDV_CONFIGS, key=["N", "D"])(_attention_bwd_dkdv_kernel)


def _geometry(qkv, num_heads):
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    half = d // 2
    return b, n, d, dict(D=d, HALF=half, BLOCK_HALF=max(16, triton.next_power_of_2(half)),
                         BLOCK_D=max(16, triton.next_power_of_2(d)),
                         # fp32 inputs (the interpreter only) get true fp32 products, as in the
                         # reference, not TF32; half-precision inputs use the default
                         DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else None)


# ---------------------------------------------------------------- backend interface
def attention_capability(interpreted):
    """What the kernels run: float16 and bfloat16, and float32 only under the interpreter (the CPU
    tests; its bf16 dot is wrong). dip_kernels.backends then picks another backend, visibly."""
    def why_not(dtype):
        if dtype == torch.float64:
            return "float64 is a testing dtype: Triton's fp64 dot support varies by GPU and version"
        if dtype == torch.float32:
            return ("float32: the kernels' ieee-precision dots spill (at DiP-XL's head dim 72, in every tile "
                    "tried) and their backward does not fit an A100's shared memory "
                    "(bench/results/precompile_before_triton3.6.0.md); torch's SDPA runs float32 attention")
        return f"the kernels run float16 and bfloat16, got {dtype}"
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if interpreted else ())
    return capability(interpreted, dtypes=dtypes, dtype_reason=why_not)


CAPABILITY = attention_capability(triton_interpreted())


def attention_forward(qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, num_heads, eps):
    b, n, d, meta = _geometry(qkv, num_heads)
    rope_cos, rope_sin = rope_cos.contiguous(), rope_sin.contiguous()
    q_norm_weight, k_norm_weight = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    out = output_buffer((b, n, num_heads * d), qkv.dtype, qkv.device)
    lse = output_buffer((b, num_heads, n), torch.float32, qkv.device)
    grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_M"]), b * num_heads)  # noqa: E731
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        launch(_fwd, grid,
               qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, lse,
               n, num_heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1),
               float(eps), _LOG2E / math.sqrt(d), **meta)
    return out, lse


def attention_backward(grad_out, qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, lse, num_heads, eps):
    b, n, d, meta = _geometry(qkv, num_heads)
    rope_cos, rope_sin = rope_cos.contiguous(), rope_sin.contiguous()
    q_norm_weight, k_norm_weight = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    # the kernels index grad_out, out (last dim) and lse as contiguous
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    device = qkv.device
    g_qkv = output_buffer(qkv.shape, qkv.dtype, device)
    delta = torch.empty((b, num_heads, n), dtype=torch.float32, device=device)
    # one row of weight-gradient partial sums per program; the largest grid any config can pick
    max_blocks = triton.cdiv(n, 16)
    gqw_part = output_buffer((b * num_heads * max_blocks, d), torch.float32, device)
    gkw_part = output_buffer((b * num_heads * max_blocks, d), torch.float32, device)
    rows_used = {}

    def dq_grid(cfg):
        rows_used["q"] = triton.cdiv(n, cfg["BLOCK_M"])
        return rows_used["q"], b * num_heads

    def dkdv_grid(cfg):
        rows_used["k"] = triton.cdiv(n, cfg["BLOCK_N"])
        return rows_used["k"], b * num_heads

    scale = 1.0 / math.sqrt(d)
    with torch.cuda.device(device) if qkv.is_cuda else contextlib.nullcontext():
        launch(_bwd_dq, dq_grid,
               qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, out, grad_out, lse, delta, g_qkv,
               gqw_part, n, num_heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0),
               out.stride(1), grad_out.stride(0), grad_out.stride(1), g_qkv.stride(0), g_qkv.stride(1),
               float(eps), _LOG2E * scale, scale, **meta)
        launch(_bwd_dkdv, dkdv_grid,
               qkv, q_norm_weight, k_norm_weight, rope_cos, rope_sin, grad_out, lse, delta, g_qkv,
               gkw_part, n, num_heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), grad_out.stride(0),
               grad_out.stride(1), g_qkv.stride(0), g_qkv.stride(1), float(eps), _LOG2E * scale,
               scale, **meta)
    g_qw = output_buffer(q_norm_weight.shape, q_norm_weight.dtype, device)
    g_kw = output_buffer(k_norm_weight.shape, k_norm_weight.dtype, device)
    g_qw.copy_(gqw_part[: b * num_heads * rows_used["q"]].sum(0))
    g_kw.copy_(gkw_part[: b * num_heads * rows_used["k"]].sum(0))
    return g_qkv, g_qw, g_kw

