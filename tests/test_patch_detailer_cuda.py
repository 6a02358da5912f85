"""The CUDA backend of the Patch Detailer Head.

CPU (no GPU needed): the CUDA backend's whole layer schedule (dip_kernels/cuda/patch_detailer.py:
weight re-layouts, views, strides, split-K choices) runs through `Emulator`, a PyTorch model of
each compiled kernel that mirrors its index math (row_coord / chunk_coord / chunk_ptr and the
epilogues of csrc/cuda/patch_detailer.cu), and is checked against the eager reference. A second
CPU test replays the kernels' per-lane ldmatrix / mma.sync fragment addressing against the PTX
fragment layouts. GPU: the compiled kernels against the reference in bf16 / fp16.
"""
import pytest
import torch
import torch.nn.functional as F

import dip_kernels
from dip_kernels.cuda import patch_detailer as pd
from dip_kernels.reference import patch_detailer as ref
from dip_kernels.testing import assert_close_to_fp64, poisoned_allocations


def make_inputs(m, patch, d, dtype, device="cpu"):
    shapes = ref.head_weight_shapes(d)
    weights = []
    for shape in shapes:
        if len(shape) == 1:
            w = 0.1 * torch.randn(shape, dtype=torch.float64)
        else:
            fan_in = shape[1] * shape[2] * shape[3] if shape[2] == 3 or shape[2] == 1 else shape[0]
            w = torch.randn(shape, dtype=torch.float64) * (2.0 / fan_in) ** 0.5
        weights.append(w)
    patches = torch.randn(m, 3, patch, patch, dtype=torch.float64)
    tokens = torch.randn(m, d, dtype=torch.float64)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(patches), cast(tokens), [cast(w) for w in weights]


# ---------------------------------------------------------------- CPU model of the kernels
def silu(v):
    return v * torch.sigmoid(v)


def silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class Emulator:
    """Executes the pd_* ops' contracts on CPU in float64 (storing in the tensors' dtype), using the
    kernels' index functions, so a wrong stride, tap order, row order or split in the schedule or
    in those functions shows up as a mismatch with the reference."""

    @staticmethod
    def geometry(src1, src2, ks, stride, pad):
        n, hi, wi, c1 = src1.shape
        ctot = c1 + (src2.shape[3] if src2 is not None else 0)
        ho = (hi + 2 * pad - ks) // stride + 1
        wo = (wi + 2 * pad - ks) // stride + 1
        return dict(nimg=n, hi=hi, wi=wi, c1=c1, ctot=ctot, ho=ho, wo=wo, rows=n * ho * wo, k=ks * ks * ctot,
                    ks=ks, stride=stride, pad=pad)

    @staticmethod
    def row_coord(r, g, pool_order):
        valid = r < g["rows"]
        rr = torch.where(valid, r, torch.zeros_like(r))
        hw = g["ho"] * g["wo"]
        n = rr // hw
        p = rr - n * hw
        if pool_order:
            half_w = g["wo"] >> 1
            q, sub = p >> 2, p & 3
            qy = q // half_w
            oy = 2 * qy + (sub >> 1)
            ox = 2 * (q - qy * half_w) + (sub & 1)
        else:
            oy = p // g["wo"]
            ox = p - oy * g["wo"]
        return n, oy, ox, valid

    @staticmethod
    def chunk_coord(k0, g):
        valid = k0 < g["k"]
        kk = torch.where(valid, k0, torch.zeros_like(k0))
        tap = kk // g["ctot"]
        c = kk - tap * g["ctot"]
        ky = tap // g["ks"]
        kx = tap - ky * g["ks"]
        return ky, kx, c, valid

    @classmethod
    def gather(cls, src1, src2, g, rowc, ncols):
        """[len(rows), ncols] float64: element (r, k) of the implicit im2col matrix."""
        n, oy, ox, rvalid = rowc
        k = torch.arange(ncols)
        ky, kx, c, kvalid = cls.chunk_coord((k // 8) * 8, g)
        c = c + k % 8
        iy = oy[:, None] * g["stride"] + ky[None, :] - g["pad"]
        ix = ox[:, None] * g["stride"] + kx[None, :] - g["pad"]
        valid = rvalid[:, None] & kvalid[None, :] & (iy >= 0) & (iy < g["hi"]) & (ix >= 0) & (ix < g["wi"])
        iyc, ixc = iy.clamp(0, g["hi"] - 1), ix.clamp(0, g["wi"] - 1)
        nn = n[:, None].expand_as(iy)
        cc = c[None, :].expand_as(iy)
        in1 = cc < g["c1"]
        vals = src1.double()[nn, iyc, ixc, cc.clamp(max=g["c1"] - 1)]
        if src2 is not None:
            v2 = src2.double()[nn, iyc, ixc, (cc - g["c1"]).clamp(0, src2.shape[3] - 1)]
            vals = torch.where(in1, vals, v2)
        else:
            valid = valid & in1
        return torch.where(valid, vals, torch.zeros_like(vals))

    @classmethod
    def conv_gemm(cls, out, src1, src2, wgemm, bias, aux, pooled, ks, stride, pad, pool_order, act, upsample):
        g = cls.geometry(src1, src2, ks, stride, pad)
        kpad, npad = wgemm.shape
        assert kpad % pd.BK == 0 and kpad >= g["k"] and npad % pd.CONV_BN == 0
        up = 2 if upsample else 1
        assert out.shape[:3] == (g["nimg"], up * g["ho"], up * g["wo"]), (out.shape, g)
        n_valid = 4 * out.shape[3] if upsample else out.shape[3]
        assert npad >= n_valid
        rowc = cls.row_coord(torch.arange(g["rows"]), g, pool_order)
        acc = cls.gather(src1, src2, g, rowc, kpad) @ wgemm.double()
        acc = acc[:, :n_valid]
        if bias is not None:
            assert bias.dtype == torch.float32 and bias.numel() == npad
            acc = acc + bias.double()[:n_valid]
        n, oy, ox, _ = rowc
        col = torch.arange(n_valid)
        if upsample:
            sub = col // out.shape[3]
            ch = col - sub * out.shape[3]
            oy = 2 * oy[:, None] + (sub >> 1)[None, :]
            ox = 2 * ox[:, None] + (sub & 1)[None, :]
        else:
            ch = col
            oy, ox = oy[:, None].expand_as(acc), ox[:, None].expand_as(acc)
        idx = (n[:, None].expand_as(acc), oy, ox, ch[None, :].expand_as(acc))
        if act == pd.ACT_SILU_BACKWARD:
            acc = acc * silu_grad(aux[idx].double())
        elif act == pd.ACT_SILU:
            if aux is not None:
                aux[idx] = acc.to(aux.dtype)
            acc = silu(acc)
        else:
            assert aux is None
        out[idx] = acc.to(out.dtype)
        assert pool_order == (pooled is not None)
        if pooled is not None:
            win = acc.view(-1, 4, n_valid).amax(1)
            first = torch.arange(0, g["rows"], 4)
            pidx = (n[first][:, None].expand_as(win), (rowc[1][first] >> 1)[:, None].expand_as(win),
                    (rowc[2][first] >> 1)[:, None].expand_as(win), col[None, :].expand_as(win))
            pooled[pidx] = win.to(pooled.dtype)

    @classmethod
    def wgrad_partial(cls, partial, a, src1, src2, ks, stride, pad):
        g = cls.geometry(src1, src2, ks, stride, pad)
        splits, mpad, npad = partial.shape
        assert mpad % pd.WG_BM == 0 and npad % pd.WG_BN == 0 and npad >= g["k"] and mpad >= a.shape[3]
        assert a.shape[:3] == (g["nimg"], g["ho"], g["wo"])
        per_split = -(-g["rows"] // splits)
        rows_per_split = -(-per_split // pd.BK) * pd.BK
        for s in range(splits):
            pix = torch.arange(s * rows_per_split, min((s + 1) * rows_per_split, g["rows"]))
            if pix.numel() == 0:
                partial[s] = 0
                continue
            rowc = cls.row_coord(pix, g, False)
            amat = torch.zeros(pix.numel(), mpad, dtype=torch.float64)
            amat[:, :a.shape[3]] = a.double()[rowc[0], rowc[1], rowc[2]]
            partial[s] = (amat.t() @ cls.gather(src1, src2, g, rowc, npad)).float()

    @staticmethod
    def colsum_partial(partial, x):
        chunks = partial.shape[0]
        flat = x.double().reshape(-1, x.shape[3])  # linear (n, y, x) order, as the kernel walks it
        per = -(-flat.shape[0] // chunks)
        for s in range(chunks):
            partial[s] = flat[s * per:(s + 1) * per].sum(0).float()

    @staticmethod
    def grad_finalize(out, partial, ctot):
        mreal, creal, taps = out.shape
        total = partial.double().sum(0)
        n = (torch.arange(taps)[None, :] * ctot + torch.arange(creal)[:, None])  # [c, t]
        out.copy_(total[:mreal][:, n].to(out.dtype))

    @staticmethod
    def pool_silu_backward(dz, h, z, dskip, dpooled):
        n, hh, ww, c = h.shape
        win = h.double().reshape(n, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(n, hh // 2, ww // 2, c, 4)
        first_max = win.argmax(-1)  # torch returns the first maximal index
        onehot = F.one_hot(first_max, 4).double() * dpooled.double()[..., None]
        scatter = onehot.reshape(n, hh // 2, ww // 2, c, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(n, hh, ww, c)
        dz.copy_(((dskip.double() + scatter) * silu_grad(z.double())).to(dz.dtype))


def _emulated_forward(patches, tokens, weights):
    return pd.run_forward(patches, tokens, pd.prepare_forward(weights), Emulator, keep=False)[0]


def _emulated_backward(grad_out, patches, tokens, weights, target_blocks=8):
    taps = (patches.shape[2] // 16) ** 2
    return pd.run_backward(grad_out, patches, tokens, weights, pd.prepare_forward(weights),
                           pd.prepare_backward(weights, taps), Emulator, target_blocks)


@pytest.mark.parametrize("m,patch", [(2, 16), (1, 32)])
def test_emulated_schedule_forward_matches_reference(m, patch):
    p64, t64, w64 = make_inputs(m, patch, 16, torch.float64)
    p32, t32, w32 = p64.float(), t64.float(), [w.float() for w in w64]
    with poisoned_allocations():
        out = _emulated_forward(p32, t32, w32)
    assert_close_to_fp64(out, ref.patch_detailer(p32, t32, w32), ref.patch_detailer(p64, t64, w64))


@pytest.mark.parametrize("m,patch", [(2, 16), (1, 32)])
def test_emulated_schedule_backward_matches_reference(m, patch):
    p64, t64, w64 = make_inputs(m, patch, 16, torch.float64)
    g64 = torch.randn(m, 3, patch, patch, dtype=torch.float64)
    p32, t32, w32, g32 = p64.float(), t64.float(), [w.float() for w in w64], g64.float()
    with poisoned_allocations():
        gp, gt, gw = _emulated_backward(g32, p32, t32, w32)
    rp, rt, rw = ref.patch_detailer_backward(g32, p32, t32, w32)
    ep, et, ew = ref.patch_detailer_backward(g64, p64, t64, w64)
    assert_close_to_fp64(gp, rp, ep, name="grad patches")
    assert_close_to_fp64(gt, rt, et, name="grad tokens")
    for name, a, b, c in zip(dip_kernels.HEAD_WEIGHT_NAMES, gw, rw, ew):
        assert a.dtype == b.dtype
        assert_close_to_fp64(a, b, c, name=f"grad {name}")


def test_weight_cache_misses_after_inplace_update():
    _, _, w = make_inputs(1, 16, 16, torch.float32)
    cache = pd._WeightCache()
    calls = []
    build = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert cache.get(w, "fwd", build) == 1
    assert cache.get(w, "fwd", build) == 1
    with torch.no_grad():
        w[3].add_(1.0)
    assert cache.get(w, "fwd", build) == 2
    w2 = [t.clone() for t in w]
    assert cache.get(w2, "fwd", build) == 3


class CountingEmulator(Emulator):
    """The CPU model of the kernels, also recording which GEMM weight matrices the schedule reads."""
    weights_read = []

    @classmethod
    def conv_gemm(cls, out, src1, src2, wgemm, *rest):
        cls.weights_read.append(wgemm)
        super().conv_gemm(out, src1, src2, wgemm, *rest)

    @staticmethod
    def target_blocks(device):
        return 8


def test_weight_cache_is_bypassed_while_a_graph_is_captured(monkeypatch):
    """The CUDA entry points on the CPU model of the kernels: eagerly the re-laid weights are
    cached and reused; while a CUDA graph is captured they are re-laid from the weights every call
    and never stored, so a replay recomputes them from the weights of that moment (an in-place
    optimizer step is seen) and never reads a cache entry that may be evicted and freed."""
    monkeypatch.setattr(pd, "CudaOps", CountingEmulator)
    monkeypatch.setattr(pd, "_cache", pd._WeightCache())
    p64, t64, w64 = make_inputs(1, 16, 16, torch.float64)
    p, t, w = p64.half(), t64.half(), [x.half() for x in w64]
    pd.patch_detailer_forward(p, t, w)
    cached = [e[3] for e in pd._cache.entries]
    assert len(cached) == 1
    pd.patch_detailer_forward(p, t, w)
    assert [e[3] for e in pd._cache.entries] == cached  # eager: a hit

    monkeypatch.setattr(pd, "capturing", lambda t: True)
    cached_ids = {id(m) for m in cached[0].values()}
    before_step = [x.clone() for x in w]
    with torch.no_grad():
        w[0].mul_(2.0)  # an optimizer step
    CountingEmulator.weights_read = []
    out = pd.patch_detailer_forward(p, t, w)
    gp, gt, gw = pd.patch_detailer_backward(torch.randn_like(p), p, t, w)
    assert CountingEmulator.weights_read and not any(id(m) in cached_ids for m in CountingEmulator.weights_read)
    assert len(pd._cache.entries) == 1 and [e[3] for e in pd._cache.entries] == cached  # nothing stored
    assert_close_to_fp64(out, ref.patch_detailer(p, t, w), ref.patch_detailer(p.double(), t.double(),
                                                                            [x.double() for x in w]))
    assert not torch.allclose(out, ref.patch_detailer(p, t, before_step), rtol=1e-2, atol=1e-2)


def test_cuda_backend_declines_float32_visibly(monkeypatch):
    """float32 heads on a CUDA build: the CUDA kernels decline them (tensor cores only), auto takes
    the Triton head, and the choice says so; nothing falls back silently inside the backend."""
    p, t, w = make_inputs(1, 16, 16, torch.float32)
    assert "tensor-core only" in pd.unsupported(p, t, w)
    assert pd.unsupported(p.half(), t.half(), w) is None and "divisible by 8" in pd.unsupported(p.half(), t[:, :12], w)
    with pytest.raises(ValueError, match="tensor-core only"):
        pd.patch_detailer_forward(p, t, w)
    # every backend this op has counts as available: as on a GPU machine with the CUDA build
    monkeypatch.setattr(dip_kernels.backends, "_unavailable_reason",
                        lambda op, b, device=None: None if b in dip_kernels.backends._MODULES[op] else "absent")
    choice = dip_kernels.backends._select("patch_detailer", "patch_detailer", torch.device("cuda"), (p, t, w))
    assert choice.backend == "triton" and "not cuda: the CUDA head kernels are tensor-core only" in choice.reason
    half = dip_kernels.backends._select("patch_detailer_backward", "patch_detailer", torch.device("cuda"),
                                        (p.half(), t.half(), w))
    assert half.backend == "cuda"


# ---------------------------------------------------------------- fragment addressing (PTX layouts)
def _ldmatrix(smem, addrs, trans):
    """ldmatrix .x4 on a 2-D smem array: lane l supplies the row address (r, c) of row l % 8 of
    matrix l // 8. Returns regs[lane][i] = the two elements register i of that lane holds."""
    mats = [torch.stack([smem[r, c:c + 8] for r, c in addrs[8 * i:8 * i + 8]]) for i in range(4)]
    regs = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if trans:
            regs.append([(mat[2 * t, g], mat[2 * t + 1, g]) for mat in mats])
        else:
            regs.append([(mat[g, 2 * t], mat[g, 2 * t + 1]) for mat in mats])
    return regs


def _mma(acc, a_regs, b_regs):
    """mma.m16n8k16 row.col with the PTX fragment layouts: a0 (g, 2t..), a1 (g+8, 2t..),
    a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t.., n g), b1 (k 2t+8.., n g); c (g | g+8, 2t..)."""
    a = torch.zeros(16, 16, dtype=torch.float64)
    b = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i, (r0, c0) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            a[r0, c0], a[r0, c0 + 1] = a_regs[lane][i]
        for i, k0 in enumerate([2 * t, 2 * t + 8]):
            b[k0, g], b[k0 + 1, g] = b_regs[lane][i]
    c = a @ b
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane] += torch.stack([c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]])


def test_conv_kernel_fragment_addressing():
    # a_smem [128][BK] as [m][k], b_smem [BK][64] as [k][n]: the conv kernel's ldmatrix addresses
    a_s = torch.randn(128, pd.BK, dtype=torch.float64)
    b_s = torch.randn(pd.BK, 64, dtype=torch.float64)
    for warp in range(4):
        warp_m, warp_n = warp >> 1, warp & 1
        acc = [[[torch.zeros(4, dtype=torch.float64) for _ in range(32)] for _ in range(4)] for _ in range(4)]
        for kk in range(0, pd.BK, 16):
            af = [_ldmatrix(a_s, [(warp_m * 64 + mt * 16 + (lane & 15), kk + (lane >> 4) * 8) for lane in range(32)],
                            False) for mt in range(4)]
            bf = [None] * 4
            for np_ in range(2):
                r = _ldmatrix(b_s, [(kk + ((lane >> 3) & 1) * 8 + (lane & 7), warp_n * 32 + np_ * 16 + (lane >> 4) * 8)
                                    for lane in range(32)], True)
                bf[2 * np_] = [[r[lane][0], r[lane][1]] for lane in range(32)]
                bf[2 * np_ + 1] = [[r[lane][2], r[lane][3]] for lane in range(32)]
            for mt in range(4):
                for nt in range(4):
                    _mma(acc[mt][nt], af[mt], bf[nt])
        want = a_s @ b_s
        for mt in range(4):
            for nt in range(4):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for e in range(4):  # the epilogue's (row, col) of accumulator element e
                        row = warp_m * 64 + mt * 16 + (e // 2) * 8 + g
                        col = warp_n * 32 + nt * 8 + 2 * t + e % 2
                        assert abs(acc[mt][nt][lane][e] - want[row, col]) < 1e-9


def test_wgrad_kernel_fragment_addressing():
    # a_smem [BK][64] as [k=pixel][m], b_smem [BK][64] as [k][n]: C = A^T B
    a_s = torch.randn(pd.BK, 64, dtype=torch.float64)
    b_s = torch.randn(pd.BK, 64, dtype=torch.float64)
    for warp in range(4):
        warp_m, warp_n = warp >> 1, warp & 1
        acc = [[[torch.zeros(4, dtype=torch.float64) for _ in range(32)] for _ in range(4)] for _ in range(2)]
        for kk in range(0, pd.BK, 16):
            af = [_ldmatrix(a_s, [(kk + (lane >> 4) * 8 + (lane & 7), warp_m * 32 + mt * 16 + ((lane >> 3) & 1) * 8)
                                  for lane in range(32)], True) for mt in range(2)]
            bf = [None] * 4
            for np_ in range(2):
                r = _ldmatrix(b_s, [(kk + ((lane >> 3) & 1) * 8 + (lane & 7), warp_n * 32 + np_ * 16 + (lane >> 4) * 8)
                                    for lane in range(32)], True)
                bf[2 * np_] = [[r[lane][0], r[lane][1]] for lane in range(32)]
                bf[2 * np_ + 1] = [[r[lane][2], r[lane][3]] for lane in range(32)]
            for mt in range(2):
                for nt in range(4):
                    _mma(acc[mt][nt], af[mt], bf[nt])
        want = a_s.t() @ b_s
        for mt in range(2):
            for nt in range(4):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for e in range(4):
                        row = warp_m * 32 + mt * 16 + (e // 2) * 8 + g
                        col = warp_n * 32 + nt * 8 + 2 * t + e % 2
                        assert abs(acc[mt][nt][lane][e] - want[row, col]) < 1e-9


def test_pool_order_windows_sit_in_shuffle_lanes():
    # In pool order, rows 4w..4w+3 are one 2x2 window; in the accumulator they sit in lanes whose
    # g = lane >> 2 differ in the low 2 bits, i.e. lane ^ 4 and lane ^ 8 (the epilogue's shuffles).
    g = Emulator.geometry(torch.zeros(2, 8, 8, 8), None, 3, 1, 1)
    n, oy, ox, _ = Emulator.row_coord(torch.arange(g["rows"]), g, True)
    seen = set()
    for base in range(0, g["rows"], 4):
        window = {(int(n[r]), int(oy[r]) // 2, int(ox[r]) // 2) for r in range(base, base + 4)}
        assert len(window) == 1
        subs = {(int(oy[r]) % 2, int(ox[r]) % 2) for r in range(base, base + 4)}
        assert subs == {(0, 0), (0, 1), (1, 0), (1, 1)} and int(oy[base]) % 2 == 0 and int(ox[base]) % 2 == 0
        seen |= {(int(n[r]), int(oy[r]), int(ox[r])) for r in range(base, base + 4)}
    assert len(seen) == g["rows"]  # a bijection onto the pixels
    for lane in range(32):
        group = {lane ^ 0, lane ^ 4, lane ^ 8, lane ^ 12}
        assert {(other >> 2) // 4 for other in group} == {(lane >> 2) // 4}


# ---------------------------------------------------------------- GPU: the compiled kernels
def _cuda_available():
    return torch.cuda.is_available() and "cuda" in dip_kernels.available_backends("patch_detailer", "cuda")


gpu = pytest.mark.gpu
needs_cuda_backend = pytest.mark.skipif(not _cuda_available(), reason="needs the CUDA build of dip_kernels._C")


def _gpu_case(m, patch, d, dtype):
    p64, t64, w64 = make_inputs(m, patch, d, torch.float64, "cuda")
    low = (p64.to(dtype), t64.to(dtype), [w.to(dtype) for w in w64])
    return (p64, t64, w64), low


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,patch", [(1, 16), (512, 16), (8192, 16), (64, 32)])
def test_cuda_forward_and_backward_match_reference(m, patch, dtype):
    d = 1152
    (p64, t64, w64), (p, t, w) = _gpu_case(m, patch, d, dtype)
    g64 = torch.randn(m, 3, patch, patch, dtype=torch.float64, device="cuda")
    g = g64.to(dtype)
    with poisoned_allocations():
        out = pd.patch_detailer_forward(p, t, w)
        gp, gt, gw = pd.patch_detailer_backward(g, p, t, w)
    assert_close_to_fp64(out, ref.patch_detailer(p, t, w), ref.patch_detailer(p64, t64, w64))
    if m > 512:  # the fp64 eager backward at 8192 patches is too slow; forward covers the size
        return
    rp, rt, rw = ref.patch_detailer_backward(g, p, t, w)
    ep, et, ew = ref.patch_detailer_backward(g64, p64, t64, w64)
    assert_close_to_fp64(gp, rp, ep, name="grad patches")
    assert_close_to_fp64(gt, rt, et, name="grad tokens")
    for name, a, b, c in zip(dip_kernels.HEAD_WEIGHT_NAMES, gw, rw, ew):
        assert a.dtype == dtype
        assert_close_to_fp64(a, b, c, name=f"grad {name}")


@gpu
@needs_cuda_backend
def test_cuda_backend_through_the_op_opcheck(backend):
    backend("cuda", "patch_detailer")
    _, (p, t, w) = _gpu_case(8, 16, 1152, torch.bfloat16)
    p.requires_grad_(True)
    t.requires_grad_(True)
    torch.library.opcheck(torch.ops.dip.patch_detailer.default, (p, t, w))


@gpu
@needs_cuda_backend
def test_cuda_graph_capture():
    _, (p, t, w) = _gpu_case(64, 16, 1152, torch.bfloat16)
    g = torch.randn_like(p)
    pd.patch_detailer_forward(p, t, w)  # warm the weight cache and the allocator
    pd.patch_detailer_backward(g, p, t, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pd.patch_detailer_forward(p, t, w)
        gp, gt, gw = pd.patch_detailer_backward(g, p, t, w)
    p.copy_(torch.randn_like(p))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, pd.patch_detailer_forward(p, t, w), rtol=0, atol=0)
    gp2, gt2, _ = pd.patch_detailer_backward(g, p, t, w)
    torch.testing.assert_close(gp, gp2, rtol=0, atol=0)
    torch.testing.assert_close(gt, gt2, rtol=0, atol=0)


@gpu
@needs_cuda_backend
def test_cuda_backward_is_deterministic():
    _, (p, t, w) = _gpu_case(512, 16, 1152, torch.bfloat16)
    g = torch.randn_like(p)
    first = pd.patch_detailer_backward(g, p, t, w)
    second = pd.patch_detailer_backward(g, p, t, w)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)
