"""The CUDA executor of the Patch Detailer Head (dip_kernels/cuda/patch_detailer.py).

CPU (no GPU needed): the CUDA executor's whole lowering of the detailer's plan (its tile-padded GEMM
operands, the 8-channel image packing, the split counts, the views it hands the kernels) runs on
``TorchKernels``, the dip_C kernels' contracts (csrc/patch_detailer.cpp) written with the torch
executor's implicit GEMM, and is checked against the reference; its operands against the
plan's re-layouts; its capability (tensor cores only) through dispatch. Two more CPU tests replay
the kernels' per-lane ldmatrix / mma.sync fragment addressing against the PTX fragment layouts and
the pool-order row map against the epilogue's shuffles. GPU: the compiled kernels against the
reference in bf16 / fp16 and determinism (opcheck and CUDA-graph capture: tests/test_backends.py).
"""
import pytest
import torch

import dip_kernels
from dip_kernels import backends
from dip_kernels.plan.patch_detailer_torch import columns, compute_dtype, implicit_gemm, silu_grad, unpool
from dip_kernels.cuda import patch_detailer as pd
from dip_kernels.plan import patch_detailer as plan
from dip_kernels.reference import patch_detailer as ref
from dip_kernels.testing import assert_close_to_fp64, poisoned_allocations

from conformance import error_measure, detailer_inputs


# ---------------------------------------------------------------- the kernels' contracts, in torch
class TorchKernels:
    """torch.ops.dip_C.patch_detailer_* as csrc/patch_detailer.cpp states them, on CPU tensors:
    every output element written (the partials' tile padding too), operands padded as the kernels
    require them."""

    @staticmethod
    def conv_gemm(out, src1, src2, wgemm, bias, aux, pooled, ks, stride, pad, pool_order, act, upsample):
        assert wgemm.shape[0] % pd.BK == 0 and wgemm.shape[1] % pd.CONV_BN == 0 and wgemm.is_contiguous()
        assert bias is None or (bias.dtype == torch.float32 and bias.numel() == wgemm.shape[1])
        assert pool_order == (pooled is not None) and (act != pd.ACT_NONE or aux is None)
        assert src1.shape[3] % 8 == 0 and (src2 is None or src2.shape[3] % 8 == 0)  # 16-byte gathers
        size = out.shape[1] // 2 if upsample else out.shape[1]
        sources = [src1] if src2 is None else [src1, src2]
        implicit_gemm([out], sources, wgemm, bias, ks, stride, pad, size, silu=act == pd.ACT_SILU, z=aux,
                      dsilu=act == pd.ACT_SILU_BACKWARD, pool=pooled, upsample=upsample)

    @staticmethod
    def wgrad_partial(partial, a, src1, src2, ks, stride, pad):
        splits, mpad, npad = partial.shape
        assert mpad % pd.WG_BM == 0 and npad % pd.WG_BN == 0
        rows = a.shape[0] * a.shape[1] * a.shape[2]
        ct = compute_dtype(a)
        cols = columns([src1] if src2 is None else [src1, src2], ks, stride, pad, a.shape[1], ct)
        lhs = a.to(ct).reshape(rows, -1)
        per = -(-(-(-rows // splits)) // pd.BK) * pd.BK  # rows per split, whole K-stages of BK
        partial.zero_()
        for s in range(splits):
            part = slice(s * per, min((s + 1) * per, rows))
            partial[s, :lhs.shape[1], :cols.shape[1]] = (lhs[part].t() @ cols[part]).float()

    @staticmethod
    def colsum_partial(partial, x):
        chunks = partial.shape[0]
        flat = x.float().reshape(-1, x.shape[3])  # linear (n, y, x) order, as the kernel walks it
        per = -(-flat.shape[0] // chunks)
        for s in range(chunks):
            partial[s] = flat[s * per:(s + 1) * per].sum(0)

    @staticmethod
    def grad_finalize(out, partial, ctot):
        mreal, creal, taps = out.shape
        index = torch.arange(taps)[None, :] * ctot + torch.arange(creal)[:, None]  # [c, t]
        out.copy_(partial.sum(0)[:mreal][:, index])

    @staticmethod
    def pool_silu_backward(dz, h, z, dskip, dpooled):
        ct = compute_dtype(dz)
        dz.copy_((dskip.to(ct) + unpool(dpooled.to(ct), h)) * silu_grad(z.to(ct)))

    @staticmethod
    def target_blocks(device):
        return 8  # a small card: several splits at the tests' sizes


LOWERED = pd.CudaExecutor(TorchKernels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,patch", [(2, 16), (1, 32)])
def test_cuda_lowering_matches_reference(m, patch, dtype):
    """The CUDA executor's forward and backward, its kernels replaced by their contracts in torch,
    against the reference: a wrong padding, packing, split, view or finalize layout is a mismatch."""
    patches, tokens, weights = detailer_inputs(m, patch, 16, dtype)
    grad_out = torch.randn(m, 3, patch, patch).to(dtype)
    with poisoned_allocations():
        out = plan.forward(LOWERED, patches, tokens, weights)
        gp, gt, gw = plan.backward(LOWERED, grad_out, patches, tokens, weights)
    hi = [t.double() for t in (patches, tokens)] + [[w.double() for w in weights]]
    assert_close_to_fp64(out, ref.patch_detailer(patches, tokens, weights), ref.patch_detailer(*hi))
    want = ref.patch_detailer_backward(grad_out, patches, tokens, weights)
    anchor = ref.patch_detailer_backward(grad_out.double(), *hi)
    names = ["grad patches", "grad tokens"] + [f"grad {n}" for n in dip_kernels.DETAILER_WEIGHT_NAMES]
    for name, g, lo, h in zip(names, [gp, gt, *gw], [want[0], want[1], *want[2]], [anchor[0], anchor[1], *anchor[2]]):
        assert g.dtype == dtype
        assert_close_to_fp64(g, lo, h, name=name, error=error_measure("patch_detailer", dtype))


def test_cuda_operands_are_the_plan_layouts_padded():
    """Every GEMM operand the CUDA executor hands its kernels is the plan's re-layout, each tap's
    channels padded to a multiple of 8 (the 3-channel images), K to BK and N to CONV_BN, with zeros;
    biases float32."""
    _, _, weights = detailer_inputs(1, 32, 16, torch.bfloat16)
    layouts = {s.weight for s in plan.forward_plan(32) + plan.backward_plan(32) if isinstance(s, plan.Conv)}
    layouts |= {s.bias for s in plan.forward_plan(32) if s.bias is not None}
    for layout in layouts:
        w = weights[plan.SLOT[layout.weight]]
        logical = plan.relayout(layout, w)
        got = pd.EXECUTOR.operand(layout, logical, w)
        if layout.kind in ("bias", "up_bias"):
            assert got.dtype == torch.float32 and got.numel() % pd.CONV_BN == 0
            assert torch.equal(got[:logical.numel()], logical.float()) and not got[logical.numel():].any()
            continue
        taps, c = layout.taps(w)
        c8 = -(-c // 8) * 8
        assert got.shape[0] % pd.BK == 0 and got.shape[1] % pd.CONV_BN == 0, layout
        k = got[:taps * c8, :logical.shape[1]].reshape(taps, c8, -1)
        assert torch.equal(k[:, :c].reshape(taps * c, -1), logical), layout
        assert not k[:, c:].any() and not got[taps * c8:].any() and not got[:, logical.shape[1]:].any(), layout


def test_cuda_backend_declines_float32_visibly(gpu_machine):
    """float32 detailers on a CUDA build: the CUDA kernels decline them (tensor cores only), auto takes
    the Triton detailer, and the choice says so; nothing falls back silently inside the backend."""
    p, t, w = detailer_inputs(1, 16, 16, torch.float32)
    assert "tensor-core only" in pd.CAPABILITY.declines("cuda", (p, t, w))
    assert pd.CAPABILITY.declines("cuda", (p.half(), t.half(), w)) is None
    assert "divisible by 8" in pd.CAPABILITY.declines("cuda", (p.half(), t[:, :12].half(), w))
    with pytest.raises(ValueError, match="tensor-core only"):
        pd.patch_detailer_forward(p, t, w)
    choice = backends._select("patch_detailer", torch.device("cuda"), (p, t, w))
    assert choice.backend == "triton" and "not cuda: the CUDA detailer kernels are tensor-core only" in choice.reason
    half = backends._select("patch_detailer_backward", torch.device("cuda"), (p.half(), t.half(), w))
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


def _pool_order_rows(n_img, ho, wo):
    """(patch, y, x) of each GEMM row in pool order, as the kernels' row_coord decodes it: rows
    4q..4q+3 are the 2x2 window q."""
    r = torch.arange(n_img * ho * wo)
    n, p = r // (ho * wo), r % (ho * wo)
    q, sub = p >> 2, p & 3
    qy = q // (wo >> 1)
    return n, 2 * qy + (sub >> 1), 2 * (q - qy * (wo >> 1)) + (sub & 1)


def test_pool_order_windows_sit_in_shuffle_lanes():
    # In pool order, rows 4w..4w+3 are one 2x2 window; in the accumulator they sit in lanes whose
    # g = lane >> 2 differ in the low 2 bits, i.e. lane ^ 4 and lane ^ 8 (the epilogue's shuffles).
    n, oy, ox = _pool_order_rows(2, 8, 8)
    rows = n.numel()
    seen = set()
    for base in range(0, rows, 4):
        window = {(int(n[r]), int(oy[r]) // 2, int(ox[r]) // 2) for r in range(base, base + 4)}
        assert len(window) == 1
        subs = {(int(oy[r]) % 2, int(ox[r]) % 2) for r in range(base, base + 4)}
        assert subs == {(0, 0), (0, 1), (1, 0), (1, 1)} and int(oy[base]) % 2 == 0 and int(ox[base]) % 2 == 0
        seen |= {(int(n[r]), int(oy[r]), int(ox[r])) for r in range(base, base + 4)}
    assert len(seen) == rows  # a bijection onto the pixels
    for lane in range(32):
        group = {lane ^ 0, lane ^ 4, lane ^ 8, lane ^ 12}
        assert {(other >> 2) // 4 for other in group} == {(lane >> 2) // 4}


# ---------------------------------------------------------------- GPU: the compiled kernels
def _cuda_available():
    return torch.cuda.is_available() and "cuda" in dip_kernels.available_backends("patch_detailer", "cuda")


gpu = pytest.mark.gpu
needs_cuda_backend = pytest.mark.skipif(not _cuda_available(), reason="needs the CUDA build of dip_kernels._C")


def _gpu_case(m, patch, d, dtype):
    p, t, w = detailer_inputs(m, patch, d, dtype, "cuda")
    return (p.double(), t.double(), [x.double() for x in w]), (p, t, w)


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
    if m > 512:  # the fp64 reference backward at 8192 patches is too slow; forward covers the size
        return
    rp, rt, rw = ref.patch_detailer_backward(g, p, t, w)
    ep, et, ew = ref.patch_detailer_backward(g64, p64, t64, w64)
    assert_close_to_fp64(gp, rp, ep, name="grad patches")
    assert_close_to_fp64(gt, rt, et, name="grad tokens")
    for name, a, b, c in zip(dip_kernels.DETAILER_WEIGHT_NAMES, gw, rw, ew):
        assert a.dtype == dtype
        assert_close_to_fp64(a, b, c, name=f"grad {name}")


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
