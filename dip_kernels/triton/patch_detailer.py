"""Triton executor of the Patch Detailer Head plan (torch.ops.dip.patch_detailer and its backward).

The schedule is dip_kernels/plan/patch_detailer.py's (the layers as GEMM steps, the weight
re-layouts, the one weight cache); this module lowers each of its steps onto one launch. Every
layer is an implicit GEMM over (patch, pixel) rows, run on tensor cores with ``tl.dot`` and fp32
accumulation; activations live channels-last, (M, S, S, C), so that the on-the-fly im2col gathers
read contiguous channels. One generic kernel (`_conv_kernel`) runs every Conv step:

* conv3x3 (pad 1), conv1x1, and the stride-2 2x2 conv that is the input gradient of a transposed
  conv: the A operand is gathered per (tap, channel block) with zero-padding masks computed per
  patch, so windows never leak across patches;
* two sources as two K ranges of one reduction, so no concat is ever materialised: the decoder
  reads (upsampled, skip), the bottleneck reads (pooled, token) where the token source has zero
  spatial strides (it is never broadcast in memory);
* epilogues: bias, SiLU, pre-activation store (backward recompute only), 2x2 max-pool (rows are
  ordered so that four consecutive rows form one pooling window: the kernel writes the skip and
  the pooled map from the same tile), the transposed conv's 2x2 scatter (ConvTranspose2d(k2, s2)
  is a per-pixel GEMM [rows, Cin] x [Cin, 4*Cout]), a split of the output columns into two tensors
  (the input gradient of a two-source conv), and the SiLU derivative.

A second kernel variant (`_conv_pool_grad_kernel`) runs a Conv step with a pool_grad epilogue: the
input gradient of an encoder conv / the bottleneck, routed in its epilogue through the 2x2 max-pool
backward, plus the skip's gradient from the decoder, times the SiLU derivative of the level below:
the gradient of the previous conv's pre-activation in one pass. WeightGrad steps are GEMMs [K, rows]
x [rows, Cout] (`_weight_grad_kernel`) split over rows into fp32 partials that torch sums in a
fixed order (deterministic, no atomics); bias gradients come out of the same kernel.

The token gradient (the bottleneck's whole map against the token weight repeated per pixel) runs
as one 1x1 GEMM whose K is the flattened map. Re-laid weights come from the plan's cache as laid
out there, unpadded: the kernels mask K and N tails.

Tiles: ``GPU_CONFIGS`` on a GPU; under the interpreter the biggest tiles (its cost is per program
and per op), with a weight-gradient split rule that still runs several splits and a partial last
one on the CPU tests' sizes, as the GPU does.

The kernels' source above the host code is kept line for line (Triton's cache key hashes source and
line numbers), so a warm Triton cache and the committed precompile reports stay valid when only the
host code below changes.

Kernel constexprs: S (rows' grid), S_IN (the source's grid), KS / STRIDE / PAD (the window),
HAS_SRC2 (a second source), FLAT_K (few input channels: K over (tap, channel) together), HAS_BIAS,
SILU, STORE_Z, DSILU, POOL, UPSAMPLE, SPLIT_N (the epilogue), BM / BN / BK (the tile) and
DOT_PREC (float32 only: tf32 or ieee, as torch.backends.cudnn.allow_tf32 says).

Row counts are never specialised (do_not_specialize), so 1 patch and 1000 share a binary; strides
are plain integer arguments, specialised by Triton only on divisibility by 16 (``python -m
dip.precompile`` compiles every specialisation a workload launches, for a GPU not here:
bench/results/precompile_*).
"""
import torch
import triton
import triton.language as tl

from . import capability, triton_interpreted
from ..plan import patch_detailer as plan
from ..plan.patch_detailer import Executor
from .launch import launch

# (the host side, below the kernels, lowers the plan's steps onto them)


# ---------------------------------------------------------------- device helpers
@triton.jit
def _decode_rows(r, S: tl.constexpr, POOL_ORDER: tl.constexpr):
    """Row -> (patch, y, x) on an SxS grid. POOL_ORDER puts each 2x2 window on 4 consecutive rows."""
    m = r // (S * S)
    q = r % (S * S)
    if POOL_ORDER:
        w = q // 4
        sub = q % 4
        y = (w // (S // 2)) * 2 + sub // 2
        x = (w % (S // 2)) * 2 + sub % 2
    else:
        y = q // S
        x = q % S
    return m, y, x


@triton.jit
def _silu_grad(z):
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def _conv_acc(a1, a2, w, m, y, x, row_ok, offs_n, n_ok, C1, C2, N,
              s1m, s1y, s1x, s1c, s2m, s2y, s2x, s2c,
              KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, S_IN: tl.constexpr,
              HAS_SRC2: tl.constexpr, FLAT_K: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """sum over (tap, channel) of src[patch, y*STRIDE+ty-PAD, x*STRIDE+tx-PAD, channel] * w[k, n],
    with channels running over source 1 then source 2 within each tap (w is [KS*KS*(C1+C2), N])."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    m64 = m.to(tl.int64)
    if FLAT_K:
        # few input channels (the RGB patches, the 3-channel output's gradient): K runs over
        # (tap, channel) together so a tile is not mostly padding
        K = KS * KS * C1
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            k_ok = kk < K
            tap = kk // C1
            c = kk % C1
            iy = y[:, None] * STRIDE + (tap // KS)[None, :] - PAD
            ix = x[:, None] * STRIDE + (tap % KS)[None, :] - PAD
            ok = row_ok[:, None] & k_ok[None, :] & (iy >= 0) & (iy < S_IN) & (ix >= 0) & (ix < S_IN)
            a = tl.load(a1 + m64[:, None] * s1m + iy * s1y + ix * s1x + c[None, :] * s1c, mask=ok, other=0.0)
            b = tl.load(w + kk[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    else:
        CT = C1 + C2
        for tap in range(KS * KS):
            iy = y * STRIDE + tap // KS - PAD
            ix = x * STRIDE + tap % KS - PAD
            ok = row_ok & (iy >= 0) & (iy < S_IN) & (ix >= 0) & (ix < S_IN)
            rows1 = a1 + m64 * s1m + iy * s1y + ix * s1x
            for c0 in range(0, C1, BK):
                c = c0 + offs_k
                c_ok = c < C1
                a = tl.load(rows1[:, None] + c[None, :] * s1c, mask=ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w + (tap * CT + c)[:, None] * N + offs_n[None, :],
                            mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            if HAS_SRC2:
                rows2 = a2 + m64 * s2m + iy * s2y + ix * s2x
                for c0 in range(0, C2, BK):
                    c = c0 + offs_k
                    c_ok = c < C2
                    a = tl.load(rows2[:, None] + c[None, :] * s2c, mask=ok[:, None] & c_ok[None, :], other=0.0)
                    b = tl.load(w + (tap * CT + C1 + c)[:, None] * N + offs_n[None, :],
                                mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


# ---------------------------------------------------------------- kernels
# rows (R) need no specialisation: they only bound masks, so 1 patch and 1000 share a binary
@triton.jit(do_not_specialize=["R"])
def _conv_kernel(a1, a2, w, bias, out, out2, zbuf, pool, R, C1, C2, N, N1, CU,
                 s1m, s1y, s1x, s1c, s2m, s2y, s2x, s2c,
                 om, oy, ox, oc, o2m, o2y, o2x, o2c, pm, py, px, pc,
                 S: tl.constexpr, S_IN: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
                 PAD: tl.constexpr, HAS_SRC2: tl.constexpr, FLAT_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SILU: tl.constexpr, STORE_Z: tl.constexpr, DSILU: tl.constexpr,
                 POOL: tl.constexpr, UPSAMPLE: tl.constexpr, SPLIT_N: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One conv-like GEMM tile [BM rows, BN output columns] and its fused epilogue.

    zbuf: STORE_Z writes the pre-activation there; DSILU multiplies by silu'(zbuf) (both in out's
    layout). UPSAMPLE: column n = (tap, c) with CU channels goes to pixel (2y+tap//2, 2x+tap%2).
    SPLIT_N: columns >= N1 go to out2 (channel n - N1). POOL: also the 2x2 max of the tile to pool.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = pid_m * BM + tl.arange(0, BM)
    row_ok = r < R
    m, y, x = _decode_rows(r, S, POOL)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    acc = _conv_acc(a1, a2, w, m, y, x, row_ok, offs_n, n_ok, C1, C2, N,
                    s1m, s1y, s1x, s1c, s2m, s2y, s2x, s2c,
                    KS, STRIDE, PAD, S_IN, HAS_SRC2, FLAT_K, BM, BN, BK, DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    m64 = m.to(tl.int64)
    mask = row_ok[:, None] & n_ok[None, :]
    if UPSAMPLE:
        tap = offs_n // CU
        oyy = y[:, None] * 2 + (tap // 2)[None, :]
        oxx = x[:, None] * 2 + (tap % 2)[None, :]
        ooff = m64[:, None] * om + oyy * oy + oxx * ox + (offs_n % CU)[None, :] * oc
    else:
        ooff = (m64 * om + y * oy + x * ox)[:, None] + offs_n[None, :] * oc
    if STORE_Z:
        tl.store(zbuf + ooff, acc.to(zbuf.dtype.element_ty), mask=mask)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if DSILU:
        z = tl.load(zbuf + ooff, mask=mask, other=0.0).to(tl.float32)
        acc = acc * _silu_grad(z)
    if SPLIT_N:
        tl.store(out + ooff, acc.to(out.dtype.element_ty), mask=mask & (offs_n < N1)[None, :])
        optr2 = out2 + (m64 * o2m + y * o2y + x * o2x)[:, None] + (offs_n - N1)[None, :] * o2c
        tl.store(optr2, acc.to(out2.dtype.element_ty), mask=mask & (offs_n >= N1)[None, :])
    else:
        tl.store(out + ooff, acc.to(out.dtype.element_ty), mask=mask)
    if POOL:
        # rows are in pooling order and BM % 4 == 0, so every window lies inside this tile
        pooled = tl.max(tl.reshape(acc, (BM // 4, 4, BN)), axis=1)
        pr = pid_m * (BM // 4) + tl.arange(0, BM // 4)
        pr_ok = pr < R // 4
        pmm, pyy, pxx = _decode_rows(pr, S // 2, False)
        pptr = pool + (pmm.to(tl.int64) * pm + pyy * py + pxx * px)[:, None] + offs_n[None, :] * pc
        tl.store(pptr, pooled.to(pool.dtype.element_ty), mask=pr_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["R"])
def _conv_pool_grad_kernel(a1, w, skip, zskip, gskip, gz, R, C1, N,
                           s1m, s1y, s1x, s1c,
                           S: tl.constexpr, S_IN: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Gradient of a pooled map (rows on the SxS pooled grid, N channels) from the conv reading it,
    then straight through the max-pool backward, plus the decoder's gradient of the skip gskip,
    times silu'(zskip): writes gz, the gradient of the pre-activation of the level below.
    skip / zskip / gskip / gz are channels-last (M, 2S, 2S, N)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = pid_m * BM + tl.arange(0, BM)
    row_ok = r < R
    m, y, x = _decode_rows(r, S, False)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    g = _conv_acc(a1, a1, w, m, y, x, row_ok, offs_n, n_ok, C1, 0, N,
                  s1m, s1y, s1x, s1c, 0, 0, 0, 0,
                  KS, 1, PAD, S_IN, False, False, BM, BN, BK, DOT_PREC)
    mask = row_ok[:, None] & n_ok[None, :]
    base = ((m.to(tl.int64) * (2 * S) + 2 * y) * (2 * S) + 2 * x) * N
    p00 = base[:, None] + offs_n[None, :]
    p01 = p00 + N
    p10 = p00 + 2 * S * N
    p11 = p10 + N
    v00 = tl.load(skip + p00, mask=mask, other=0.0)
    v01 = tl.load(skip + p01, mask=mask, other=0.0)
    v10 = tl.load(skip + p10, mask=mask, other=0.0)
    v11 = tl.load(skip + p11, mask=mask, other=0.0)
    vmax = tl.maximum(tl.maximum(v00, v01), tl.maximum(v10, v11))
    # the gradient goes to the first maximum in scan order, as in torch's max_pool2d
    t00 = v00 == vmax
    t01 = (v01 == vmax) & ~t00
    t10 = (v10 == vmax) & ~(t00 | t01)
    t11 = ~(t00 | t01 | t10)
    _pool_grad_store(g, t00, p00, zskip, gskip, gz, mask)
    _pool_grad_store(g, t01, p01, zskip, gskip, gz, mask)
    _pool_grad_store(g, t10, p10, zskip, gskip, gz, mask)
    _pool_grad_store(g, t11, p11, zskip, gskip, gz, mask)


@triton.jit
def _pool_grad_store(g, is_max, offs, zskip, gskip, gz, mask):
    gs = tl.load(gskip + offs, mask=mask, other=0.0).to(tl.float32) + tl.where(is_max, g, 0.0)
    z = tl.load(zskip + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gz + offs, (gs * _silu_grad(z)).to(gz.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R", "ROWS_PER_SPLIT"])
def _weight_grad_kernel(a, g, ws, wsb, R, C, N, CT, K_OFF, ROWS_PER_SPLIT,
                        am, ay, ax, ac, gm, gy, gx, gc,
                        S: tl.constexpr, S_IN: tl.constexpr, KS: tl.constexpr, PAD: tl.constexpr,
                        A_TAP: tl.constexpr, B_STRIDE: tl.constexpr, B_TAP: tl.constexpr,
                        FLAT_K: tl.constexpr, BIAS: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Partial weight gradient of one row split: ws[split, tap*CT + K_OFF + c, n] =
    sum over rows of a[pixel_a(row, tap), c] * g[pixel_b(row, tap), n] with
    pixel_a = (y + A_TAP*ty - PAD, ...) and pixel_b = (B_STRIDE*y + B_TAP*ty, ...).
    A conv: A_TAP=1, B_STRIDE=1, B_TAP=0; a transposed conv: A_TAP=0, B_STRIDE=2, B_TAP=1.
    BIAS: the tap's first channel tile also sums g over rows into wsb[split, tap or 0, n]."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BK)
    if FLAT_K:
        kk = pid_k * BK + offs_k
        k_ok = kk < KS * KS * C
        tap = kk // C
        c = kk % C
        k_out = kk
        first = pid_k == 0
        tap_b = 0
    else:
        nkb = tl.cdiv(C, BK)
        tap_s = pid_k // nkb
        c = (pid_k % nkb) * BK + offs_k
        k_ok = c < C
        tap = tap_s + 0 * offs_k
        k_out = tap_s * CT + K_OFF + c
        if B_TAP:
            first = pid_k % nkb == 0
        else:
            first = pid_k == 0
        tap_b = tap_s
    ty = tap // KS
    tx = tap % KS
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    bacc = tl.zeros((BN,), dtype=tl.float32)
    r_start = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, R)
    for r0 in range(r_start, r_end, BM):
        r = r0 + tl.arange(0, BM)
        row_ok = r < r_end
        m, y, x = _decode_rows(r, S, False)
        m64 = m.to(tl.int64)
        iy = y[None, :] + A_TAP * ty[:, None] - PAD
        ix = x[None, :] + A_TAP * tx[:, None] - PAD
        ok = k_ok[:, None] & row_ok[None, :] & (iy >= 0) & (iy < S_IN) & (ix >= 0) & (ix < S_IN)
        at = tl.load(a + m64[None, :] * am + iy * ay + ix * ax + c[:, None] * ac, mask=ok, other=0.0)
        gyy = y * B_STRIDE + B_TAP * (tap_b // KS)
        gxx = x * B_STRIDE + B_TAP * (tap_b % KS)
        b = tl.load(g + (m64 * gm + gyy * gy + gxx * gx)[:, None] + offs_n[None, :] * gc,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(at, b, acc, input_precision=DOT_PREC)
        if BIAS:
            bacc += tl.sum(b.to(tl.float32), axis=0)
    tl.store(ws + (split * (KS * KS * CT) + k_out)[:, None].to(tl.int64) * N + offs_n[None, :], acc,
             mask=k_ok[:, None] & n_ok[None, :])
    if BIAS:
        if B_TAP:
            tl.store(wsb + (split * KS * KS + tap_b) * N + offs_n, bacc, mask=n_ok & first)
        else:
            tl.store(wsb + split * N + offs_n, bacc, mask=n_ok & first)


# ---------------------------------------------------------------- host side: configs and sources
# GPU tiles per kernel, (BM, BN, BK, num_warps, num_stages) as a function of the output columns n:
# tiles that compile without spills for sm_90 and sm_80 with triton 3.6 and 3.8 (python -m
# dip_kernels.precompile; bench/results/precompile_*). A 128 x 128 fp32 accumulator takes 128
# registers a thread at 4 warps, so the conv GEMMs run 8 warps; the pool-gradient epilogue holds the
# accumulator plus four skip tiles and their max-pool routing, hence 64 x 64 tiles there; the
# weight-gradient GEMMs (BM rows of the reduction per step, BK x BN outputs) step 64 rows at a time.
GPU_CONFIGS = {
    "conv": lambda n: (128, 64 if n <= 64 else 128, 32, 8, 3),
    "pool_grad": lambda n: (64, 64, 32, 4, 3),
    "weight_grad": lambda n: (64, 64 if n <= 64 else 128, 32, 8, 3),
}


def _config(kernel, n):
    """(BM, BN, BK, num_warps, num_stages) of ``kernel`` (a GPU_CONFIGS key) for n output columns."""
    if triton_interpreted():
        # the interpreter's cost is per program and per op, not per element: the biggest tiles
        return 256, 256, 256, 4, 1
    return GPU_CONFIGS[kernel](n)


def _dot_precision(dtype):
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


class _Src:
    """A source of an implicit GEMM: tensor, channels and (patch, y, x, channel) strides."""

    def __init__(self, t, c, sm, sy, sx, sc):
        self.t, self.c, self.strides = t, c, (sm, sy, sx, sc)


def _nhwc(t):
    m, s, _, c = t.shape
    return _Src(t, c, s * s * c, s * c, c, 1)


def _nchw(t):
    sm, sc, sy, sx = t.stride()
    return _Src(t, t.shape[1], sm, sy, sx, sc)


def _strides_nhwc(t):
    m, s, _, c = t.shape
    return (s * s * c, s * c, c, 1)


def _strides_nchw(t):
    m, c, s, _ = t.shape
    return (c * s * s, s, 1, s * s)


def _conv(src1, weight, n, rows_s, *, src2=None, ks=3, stride=1, s_in=None, bias=None, silu=False,
          out=None, out_strides=None, zbuf=None, store_z=False, dsilu=False, pool=None, upsample_c=0,
          out2=None, n1=0):
    """Launch _conv_kernel: rows are every pixel of the rows_s x rows_s grid of every patch."""
    m = src1.t.shape[0]
    r = m * rows_s * rows_s
    bm, bn, bk, warps, stages = _config("conv", n)
    pad = (ks - 1) // 2 if stride == 1 else 0
    s_in = rows_s if s_in is None else s_in
    s2 = src2 or src1
    o2s = _strides_nhwc(out2) if out2 is not None else (0, 0, 0, 0)
    ps = _strides_nhwc(pool) if pool is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(r, bm), triton.cdiv(n, bn))
    launch(_conv_kernel, grid,
           src1.t, s2.t, weight, bias if bias is not None else weight, out,
           out2 if out2 is not None else out, zbuf if zbuf is not None else out,
           pool if pool is not None else out,
           r, src1.c, s2.c if src2 is not None else 0, n, n1, upsample_c or 1,
           *src1.strides, *s2.strides, *out_strides, *o2s, *ps,
           S=rows_s, S_IN=s_in, KS=ks, STRIDE=stride, PAD=pad, HAS_SRC2=src2 is not None,
           FLAT_K=src2 is None and src1.c < 16,
           HAS_BIAS=bias is not None, SILU=silu, STORE_Z=store_z, DSILU=dsilu, POOL=pool is not None,
           UPSAMPLE=upsample_c > 0, SPLIT_N=out2 is not None,
           BM=bm, BN=bn, BK=bk, DOT_PREC=_dot_precision(weight.dtype), num_warps=warps, num_stages=stages)
    return out


def _pool_grad(src, weight, n, rows_s, ks, skip, zskip, gskip, gz):
    """Input gradient of the conv reading a pooled map, through the pool and SiLU (see kernel),
    written to gz (channels-last, shaped like skip)."""
    m = src.t.shape[0]
    r = m * rows_s * rows_s
    bm, bn, bk, warps, stages = _config("pool_grad", n)
    grid = (triton.cdiv(r, bm), triton.cdiv(n, bn))
    launch(_conv_pool_grad_kernel, grid,
           src.t, weight, skip, zskip, gskip, gz, r, src.c, n, *src.strides,
           S=rows_s, S_IN=rows_s, KS=ks, PAD=(ks - 1) // 2,
           BM=bm, BN=bn, BK=bk, DOT_PREC=_dot_precision(weight.dtype), num_warps=warps, num_stages=stages)
    return gz


def _row_splits(rows, bm, tiles):
    """(splits, rows per split) of a weight-gradient GEMM over ``rows`` rows with ``tiles`` output
    tiles: enough programs to fill the GPU (two per SM of an H100/H200), at least 8 row tiles per
    split; fixed by the shape alone, so the result is deterministic. Under the interpreter the same
    rule for a small machine and 2 row tiles, so that the CPU tests run several splits and a partial
    last one, as the GPU does."""
    programs, min_tiles = (8, 2) if triton_interpreted() else (264, 8)
    return plan.row_splits(rows, tiles, programs=programs, min_rows=min_tiles * bm, granule=bm)


def _weight_grad(sources, g, n, rows_s, *, ks, transposed=False, g_strides=None):
    """fp32 (weight gradient [KS*KS, sum(C), n], bias gradient [n]) from the sources of a conv
    (or the input of a transposed conv) and the gradient g of its output (channels-last)."""
    m = g.shape[0]
    r = m * rows_s * rows_s
    ct = sum(s.c for s in sources)
    bm, bn, bk, warps, stages = _config("weight_grad", n)
    a_tap, b_stride, b_tap = (0, 2, 1) if transposed else (1, 1, 0)
    pad = 0 if transposed else (ks - 1) // 2
    flat = len(sources) == 1 and sources[0].c < 16
    ktiles = [triton.cdiv(ks * ks * s.c, bk) if flat else ks * ks * triton.cdiv(s.c, bk) for s in sources]
    splits, rows_per_split = _row_splits(r, bm, sum(ktiles) * triton.cdiv(n, bn))
    ws = torch.empty((splits, ks * ks * ct, n), dtype=torch.float32, device=g.device)
    nbt = ks * ks if transposed else 1
    wsb = torch.empty((splits, nbt, n), dtype=torch.float32, device=g.device)
    k_off = 0
    for i, (src, kt) in enumerate(zip(sources, ktiles)):
        launch(_weight_grad_kernel, (kt, triton.cdiv(n, bn), splits),
               src.t, g, ws, wsb, r, src.c, n, ct, k_off, rows_per_split,
               *src.strides, *(g_strides or _strides_nhwc(g)),
               S=rows_s, S_IN=rows_s, KS=ks, PAD=pad, A_TAP=a_tap, B_STRIDE=b_stride, B_TAP=b_tap,
               FLAT_K=flat, BIAS=i == 0,
               BM=bm, BN=bn, BK=bk, DOT_PREC=_dot_precision(g.dtype), num_warps=warps, num_stages=stages)
        k_off += src.c
    return ws.sum(0).view(ks * ks, ct, n), wsb.sum((0, 1))


# ---------------------------------------------------------------- the plan's steps on these kernels
class TritonExecutor(Executor):
    """Sources are _Src (tensor, channels, strides); outputs (tensor, strides)."""
    name = "triton"

    def empty_split(self, shape, c1, like):
        # two tensors: the split epilogue writes each contiguous
        return self.empty((*shape[:3], c1), like), self.empty((*shape[:3], shape[3] - c1), like), None

    def act(self, t):
        return _nhwc(t)

    def image(self, t):
        return _nchw(t)

    def token(self, t, size):
        return _Src(t, t.shape[1], t.stride(0), 0, 0, t.stride(1))

    def image_out(self, t):
        return t, _strides_nchw(t)

    def token_out(self, t):
        return t, (t.stride(0), 0, 0, t.stride(1))

    def conv(self, step, out, sources, weight, bias, z=None, pool=None, pool_grad=None, whole=None):
        n = weight.shape[1]
        if pool_grad is not None:
            skip, zskip, gskip = pool_grad
            _pool_grad(sources[0], weight, n, step.size, step.ks, skip, zskip, gskip, out[0].t)
            return
        src1, src2 = sources[0], sources[1] if len(sources) > 1 else None
        s_in = src1.t.shape[2]
        ks, stride = step.ks, step.stride
        if isinstance(out[0], tuple) and out[0][0].dim() == 2:
            # the token gradient: the whole bottleneck map against the token weight repeated per
            # pixel is one 1x1 GEMM whose K is the flattened map
            g = src1.t
            src1 = _Src(g, g.shape[1] * g.shape[2] * g.shape[3], g.shape[1] * g.shape[2] * g.shape[3], 0, 0, 1)
            ks, stride, s_in = 1, 1, 1
        target, strides = out[0] if isinstance(out[0], tuple) else (out[0].t, out[0].strides)
        split = len(out) == 2
        _conv(src1, weight, n, step.size, src2=src2, ks=ks, stride=stride, s_in=s_in, bias=bias,
              silu=step.silu, out=target, out_strides=strides, zbuf=z, store_z=step.silu and z is not None,
              dsilu=step.dsilu is not None, pool=pool, upsample_c=n // 4 if step.upsample else 0,
              out2=out[1].t if split else None, n1=out[0].c if split else 0)

    def weight_grad(self, step, grad_weight, grad_bias, grad, sources):
        n = grad.c
        w_g, b_g = _weight_grad(sources, grad.t, n, step.size, ks=step.ks, transposed=step.transposed,
                                g_strides=grad.strides)
        kk, ci, co = w_g.shape
        k = int(round(kk ** 0.5))
        if step.transposed:  # [4, Cin, Cout] -> (Cin, Cout, 2, 2)
            grad_weight.copy_(w_g.view(2, 2, ci, co).permute(2, 3, 0, 1))
        else:  # [k*k, Cin, Cout] -> (Cout, Cin, k, k)
            grad_weight.copy_(w_g.view(k, k, ci, co).permute(3, 2, 0, 1))
        grad_bias.copy_(b_g)


EXECUTOR = TritonExecutor()
CAPABILITY = capability()  # every floating dtype, any shape


def patch_detailer_forward(patches, tokens, weights):
    return plan.forward(EXECUTOR, patches, tokens, weights)


def patch_detailer_backward(grad_out, patches, tokens, weights):
    return plan.backward(EXECUTOR, grad_out, patches, tokens, weights)
