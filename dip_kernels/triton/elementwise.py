"""Triton kernels for the elementwise parts of a DiP block (see dip_kernels.reference.elementwise):
rmsnorm_modulate, gated_residual and swiglu, forward and backward, all computed in float32.

Each kernel reads every activation once and writes every result once. A program owns a 2D tile
[ROWS, BLOCK_D] of (batch, token) rows by features: whole rows for rmsnorm (its statistic spans D),
a column block otherwise. Per-batch reductions over tokens (gshift, gscale, gweight, ggate) are
written as float32 per-program partials and finished with torch.sum: deterministic, no atomics, no
host sync. Arbitrary input strides are honoured; outputs are contiguous.
"""
import contextlib

import torch
import triton
import triton.language as tl

from . import capability, triton_interpreted
from .._alloc import output_buffer
from .launch import launch

# elements per tile: enough bytes in flight to saturate HBM, few enough registers per thread
_TILE_ELEMENTS = 4096
# rows folded into one partial-sum row: the partials (write + re-read, float32) cost about
# 16 / (6 * _ROWS_PER_PARTIAL) of the main traffic in bf16
_ROWS_PER_PARTIAL = 32


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_options(num_warps):
    return {} if triton_interpreted() else {"num_warps": num_warps}


def _col_block(d):
    """A column block that tiles d with little padding (model widths are multiples of 64 or 128)."""
    if d <= 256:
        return triton.next_power_of_2(d)
    for block in (256, 128, 64):
        if d % block == 0:
            return block
    return 256


def _row_tiling(n_rows, block_d, with_partials):
    """(ROWS per tile, tiles per program) for n_rows rows of block_d columns."""
    rows = max(1, min(_TILE_ELEMENTS // block_d, triton.next_power_of_2(max(n_rows, 1))))
    iters = 1
    if with_partials:
        iters = max(1, min(_ROWS_PER_PARTIAL // rows, triton.cdiv(n_rows, rows)))
    return rows, iters


# ---------------------------------------------------------------- rmsnorm_modulate
# row counts need no specialisation (they only bound masks and scale row indices by D)
@triton.jit(do_not_specialize=["N"])
def _rmsnorm_modulate_fwd_kernel(
    x_ptr, w_ptr, shift_ptr, scale_ptr, y_ptr,
    N, D, eps,
    x_sb, x_sn, x_sd, w_sd, shift_sb, shift_sd, scale_sb, scale_sd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(x_ptr + b * x_sb + rows[:, None].to(tl.int64) * x_sn + cols[None, :] * x_sd,
                mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols * w_sd, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * shift_sb + cols * shift_sd, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * scale_sb + cols * scale_sd, mask=col_ok, other=0.0).to(tl.float32)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    # the reference's rounding order: ((x * rstd) * w) * (1 + scale) + shift
    y = (x * rstd[:, None]) * w[None, :] * (1.0 + scale[None, :]) + shift[None, :]
    y_off = (b * N + rows[:, None].to(tl.int64)) * D + cols[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "n_chunks"])
def _rmsnorm_modulate_bwd_kernel(
    gy_ptr, x_ptr, w_ptr, scale_ptr, gx_ptr, part_gy_ptr, part_gy_xhat_ptr,
    N, D, eps, n_chunks,
    gy_sb, gy_sn, gy_sd, x_sb, x_sn, x_sd, w_sd, scale_sb, scale_sd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr,
):
    # y = xhat * w * (1 + scale) + shift, xhat = x * rstd; with g = gy * w * (1 + scale):
    #   gx = rstd * (g - xhat * mean(g * xhat)),  gshift = sum_n gy,
    #   gscale = w * sum_n gy * xhat,  gweight = sum_b (1 + scale) * sum_n gy * xhat
    # so two per-batch partials (sum gy, sum gy * xhat) give all three parameter gradients.
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols * w_sd, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * scale_sb + cols * scale_sd, mask=col_ok, other=0.0).to(tl.float32)
    w_mod = w * (1.0 + scale)

    acc_gy = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gy_xhat = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(ITERS):
        rows = (chunk * ITERS + it) * ROWS + tl.arange(0, ROWS)
        mask = (rows < N)[:, None] & col_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + b * x_sb + rows64 * x_sn + cols[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + b * gy_sb + rows64 * gy_sn + cols[None, :] * gy_sd,
                     mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = x * rstd[:, None]
        g = gy * w_mod[None, :]
        mean_g_xhat = tl.sum(g * xhat, axis=1) / D
        gx = rstd[:, None] * (g - xhat * mean_g_xhat[:, None])
        tl.store(gx_ptr + (b * N + rows64) * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)
        # masked rows and columns load as zero, so they add nothing
        acc_gy += tl.sum(gy, axis=0)
        acc_gy_xhat += tl.sum(gy * xhat, axis=0)

    part_off = (b * n_chunks + chunk) * D + cols
    tl.store(part_gy_ptr + part_off, acc_gy, mask=col_ok)
    tl.store(part_gy_xhat_ptr + part_off, acc_gy_xhat, mask=col_ok)


def rmsnorm_modulate_forward(x, weight, shift, scale, eps, out_dtype=None):
    b, n, d = x.shape
    y = output_buffer((b, n, d), out_dtype or x.dtype, x.device)
    if y.numel() == 0:
        return y
    block_d = triton.next_power_of_2(d)
    rows, _ = _row_tiling(n, block_d, False)
    grid = (triton.cdiv(n, rows), b)
    with _device_guard(x):
        launch(_rmsnorm_modulate_fwd_kernel, grid,
               x, weight, shift, scale, y, n, d, eps,
               *x.stride(), *weight.stride(), *shift.stride(), *scale.stride(),
               ROWS=rows, BLOCK_D=block_d, **_launch_options(8 if block_d >= 2048 else 4))
    return y


def rmsnorm_modulate_backward(grad_y, x, weight, shift, scale, eps):
    b, n, d = x.shape
    gx = output_buffer((b, n, d), x.dtype, x.device)
    block_d = triton.next_power_of_2(d)
    rows, iters = _row_tiling(n, block_d, True)
    n_chunks = triton.cdiv(n, rows * iters)
    part_gy = output_buffer((b, n_chunks, d), torch.float32, x.device)
    part_gy_xhat = output_buffer((b, n_chunks, d), torch.float32, x.device)
    if gx.numel():
        with _device_guard(x):
            launch(_rmsnorm_modulate_bwd_kernel, (n_chunks, b),
                   grad_y, x, weight, scale, gx, part_gy, part_gy_xhat, n, d, eps, n_chunks,
                   *grad_y.stride(), *x.stride(), *weight.stride(), *scale.stride(),
                   ROWS=rows, BLOCK_D=block_d, ITERS=iters, **_launch_options(8 if block_d >= 2048 else 4))
    sum_gy_xhat = part_gy_xhat.sum(1)
    g_shift = part_gy.sum(1).to(shift.dtype)
    g_scale = (sum_gy_xhat * weight.float()).to(scale.dtype)
    g_weight = (sum_gy_xhat * (1.0 + scale.float())).sum(0).to(weight.dtype)
    return gx, g_weight, g_shift, g_scale


# ---------------------------------------------------------------- gated_residual
@triton.jit(do_not_specialize=["N"])
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, f_ptr, y_ptr,
    N, D,
    x_sb, x_sn, x_sd, gate_sb, gate_sd, f_sb, f_sn, f_sd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    col_ok = cols < D
    mask = (rows < N)[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + b * x_sb + rows64 * x_sn + cols[None, :] * x_sd, mask=mask).to(tl.float32)
    f = tl.load(f_ptr + b * f_sb + rows64 * f_sn + cols[None, :] * f_sd, mask=mask).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_sb + cols * gate_sd, mask=col_ok).to(tl.float32)
    y = x + gate[None, :] * f
    tl.store(y_ptr + (b * N + rows64) * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "n_chunks"])
def _gated_residual_bwd_kernel(
    gy_ptr, gate_ptr, f_ptr, gx_ptr, gf_ptr, part_ggate_ptr,
    N, D, n_chunks,
    gy_sb, gy_sn, gy_sd, gate_sb, gate_sd, f_sb, f_sn, f_sd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    col_ok = cols < D
    gate = tl.load(gate_ptr + b * gate_sb + cols * gate_sd, mask=col_ok, other=0.0).to(tl.float32)
    acc_ggate = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(ITERS):
        rows = (chunk * ITERS + it) * ROWS + tl.arange(0, ROWS)
        mask = (rows < N)[:, None] & col_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        gy = tl.load(gy_ptr + b * gy_sb + rows64 * gy_sn + cols[None, :] * gy_sd, mask=mask, other=0.0)
        f = tl.load(f_ptr + b * f_sb + rows64 * f_sn + cols[None, :] * f_sd, mask=mask, other=0.0).to(tl.float32)
        out_off = (b * N + rows64) * D + cols[None, :]
        tl.store(gx_ptr + out_off, gy.to(gx_ptr.dtype.element_ty), mask=mask)
        gy = gy.to(tl.float32)
        tl.store(gf_ptr + out_off, (gate[None, :] * gy).to(gf_ptr.dtype.element_ty), mask=mask)
        acc_ggate += tl.sum(gy * f, axis=0)
    tl.store(part_ggate_ptr + (b * n_chunks + chunk) * D + cols, acc_ggate, mask=col_ok)


def gated_residual_forward(x, gate, f):
    b, n, d = x.shape
    y = output_buffer((b, n, d), x.dtype, x.device)
    if y.numel() == 0:
        return y
    block_d = _col_block(d)
    rows, _ = _row_tiling(n, block_d, False)
    grid = (triton.cdiv(n, rows), triton.cdiv(d, block_d), b)
    with _device_guard(x):
        launch(_gated_residual_fwd_kernel, grid,
               x, gate, f, y, n, d, *x.stride(), *gate.stride(), *f.stride(),
               ROWS=rows, BLOCK_D=block_d, **_launch_options(4))
    return y


def gated_residual_backward(grad_y, x, gate, f):
    b, n, d = x.shape
    gx = output_buffer((b, n, d), x.dtype, x.device)
    gf = output_buffer((b, n, d), f.dtype, x.device)
    block_d = _col_block(d)
    rows, iters = _row_tiling(n, block_d, True)
    n_chunks = triton.cdiv(n, rows * iters)
    part_ggate = output_buffer((b, n_chunks, d), torch.float32, x.device)
    if gx.numel():
        grid = (n_chunks, triton.cdiv(d, block_d), b)
        with _device_guard(x):
            launch(_gated_residual_bwd_kernel, grid,
                   grad_y, gate, f, gx, gf, part_ggate, n, d, n_chunks,
                   *grad_y.stride(), *gate.stride(), *f.stride(),
                   ROWS=rows, BLOCK_D=block_d, ITERS=iters, **_launch_options(4))
    return gx, part_ggate.sum(1).to(gate.dtype), gf


# ---------------------------------------------------------------- swiglu
# M (rows) stays specialised: unspecialised, triton 3.6's ptxas spills the sm_80 backward; the model's
# row counts (batch x tokens) are multiples of 16, so they share one binary anyway
@triton.jit
def _swiglu_fwd_kernel(
    ab_ptr, y_ptr, M, H, ab_sm, ab_sh,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    a_ptrs = ab_ptr + rows[:, None].to(tl.int64) * ab_sm + cols[None, :] * ab_sh
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(a_ptrs + H * ab_sh, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * bv
    tl.store(y_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    gy_ptr, ab_ptr, gab_ptr, M, H, gy_sm, gy_sh, ab_sm, ab_sh,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    a_ptrs = ab_ptr + rows64 * ab_sm + cols[None, :] * ab_sh
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(a_ptrs + H * ab_sh, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + rows64 * gy_sm + cols[None, :] * gy_sh, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    silu = a * sig
    # d silu / da = sig * (1 + a * (1 - sig))
    ga = gy * bv * sig * (1.0 + a * (1.0 - sig))
    gb = gy * silu
    ga_ptrs = gab_ptr + rows64 * (2 * H) + cols[None, :]
    tl.store(ga_ptrs, ga.to(gab_ptr.dtype.element_ty), mask=mask)
    tl.store(ga_ptrs + H, gb.to(gab_ptr.dtype.element_ty), mask=mask)


def _swiglu_tiling(m, h):
    block_h = _col_block(h)
    rows, _ = _row_tiling(m, block_h, False)
    return rows, block_h, (triton.cdiv(m, rows), triton.cdiv(h, block_h))


def swiglu_forward(ab):
    h = ab.shape[-1] // 2
    ab2 = ab.reshape(-1, 2 * h)  # a view unless the leading dims cannot be merged
    m = ab2.shape[0]
    y = output_buffer((*ab.shape[:-1], h), ab.dtype, ab.device)
    if y.numel() == 0:
        return y
    rows, block_h, grid = _swiglu_tiling(m, h)
    with _device_guard(ab):
        launch(_swiglu_fwd_kernel, grid, ab2, y, m, h, *ab2.stride(), ROWS=rows, BLOCK_H=block_h, **_launch_options(4))
    return y


def swiglu_backward(grad_y, ab):
    h = ab.shape[-1] // 2
    ab2 = ab.reshape(-1, 2 * h)
    gy2 = grad_y.reshape(-1, h)
    m = ab2.shape[0]
    g_ab = output_buffer(ab.shape, ab.dtype, ab.device)
    if g_ab.numel() == 0:
        return g_ab
    rows, block_h, grid = _swiglu_tiling(m, h)
    with _device_guard(ab):
        launch(_swiglu_bwd_kernel, grid, gy2, ab2, g_ab, m, h, *gy2.stride(), *ab2.stride(),
               ROWS=rows, BLOCK_H=block_h, **_launch_options(4))
    return g_ab


CAPABILITY = capability()  # every floating dtype, any shape
