"""CUDA backend of the Patch Detailer Head: the layer schedule over the compiled building blocks
torch.ops.dip_C.pd_* (csrc/patch_detailer.cpp, csrc/cuda/patch_detailer.cu).

The schedule is written against a small interface (``conv_gemm``, ``wgrad_partial``,
``colsum_partial``, ``grad_finalize``, ``pool_silu_backward``) so that tests can run the very same
schedule through a CPU emulation of the kernels (tests/test_patch_detailer_cuda.py). Activations
are channels-last (N, H, W, C); see the comment at the top of the .cu for the GEMM views and the
recompute-vs-store memory budget.

bf16 and fp16 run on the kernels. The backend declines float32 / float64 inputs and token widths
that are not a multiple of 8 (``unsupported``: the kernels are tensor-core only with 16-byte
gathers); dip_kernels.backends then picks another backend, visibly (``dip_kernels.explain``).
"""
import weakref

import torch
import torch.nn.functional as F

from ..backends import capturing
from ..reference.patch_detailer import DECODER_CHANNELS, ENCODER_CHANNELS, HEAD_WEIGHT_NAMES
from ..testing import output_buffer

# Tile sizes of the kernels (must match csrc/cuda/patch_detailer.cu).
BK = 32          # K depth of a stage: GEMM weight matrices are padded to a multiple of it
CONV_BN = 64     # conv output-channel tile: weight matrices padded to a multiple of it
WG_BM = 64       # wgrad tiles
WG_BN = 64
ACT_NONE, ACT_SILU, ACT_SILU_BACKWARD = 0, 1, 2
IN_PAD = 8       # the 3 input / output image channels padded to 8 (16-byte gathers)
MIN_ROWS_PER_SPLIT = 256

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _round_up(x, m):
    return (x + m - 1) // m * m


def unsupported(patches, tokens, *_):
    """Why the kernels cannot run these inputs, or None."""
    if patches.dtype not in KERNEL_DTYPES:
        return f"the CUDA head kernels are tensor-core only (bfloat16, float16), got {patches.dtype}"
    if tokens.shape[1] % 8:
        return f"the CUDA head kernels need a token width divisible by 8, got {tokens.shape[1]}"
    return None


# ---------------------------------------------------------------- weight re-layout (cached)
def _gemm_matrix(mat):
    """[K, N] -> contiguous [round_up(K, BK), round_up(N, CONV_BN)], zero padded."""
    k, n = mat.shape
    return F.pad(mat, (0, _round_up(n, CONV_BN) - n, 0, _round_up(k, BK) - k)).contiguous()


def _bias_vector(b, repeat=1):
    v = b.float().repeat(repeat)
    return F.pad(v, (0, _round_up(v.numel(), CONV_BN) - v.numel())).contiguous()


def _conv3_forward_matrix(w):
    """(co, ci, 3, 3) -> B[(ky, kx, ci), co]."""
    co, ci = w.shape[:2]
    return _gemm_matrix(w.permute(2, 3, 1, 0).reshape(9 * ci, co))


def _conv3_dgrad_matrix(w):
    """(co, ci, 3, 3) -> B[(ky', kx', co), ci] = w[co, ci, 2 - ky', 2 - kx']: the input gradient is
    the output gradient convolved (pad 1) with the flipped kernel, channels swapped."""
    co, ci = w.shape[:2]
    return _gemm_matrix(w.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * co, ci))


def prepare_forward(weights):
    w = dict(zip(HEAD_WEIGHT_NAMES, weights))
    prep = {}
    for level in range(1, 5):
        wt = w[f"enc{level}.weight"]
        if level == 1:
            wt = F.pad(wt, (0, 0, 0, 0, 0, IN_PAD - wt.shape[1]))
        prep[f"enc{level}"] = _conv3_forward_matrix(wt)
        prep[f"enc{level}.b"] = _bias_vector(w[f"enc{level}.bias"])
        prep[f"dec{level}"] = _conv3_forward_matrix(w[f"dec{level}.weight"])
        prep[f"dec{level}.b"] = _bias_vector(w[f"dec{level}.bias"])
        up = w[f"up{level}.weight"]  # (ci, co, 2, 2) -> B[ci, (dy, dx, co)]
        ci, co = up.shape[:2]
        prep[f"up{level}"] = _gemm_matrix(up.permute(0, 2, 3, 1).reshape(ci, 4 * co))
        prep[f"up{level}.b"] = _bias_vector(w[f"up{level}.bias"], repeat=4)
    wb = w["bottleneck.weight"][:, :, 0, 0]  # (512, 512 + D)
    prep["bottleneck"] = _gemm_matrix(wb.t())
    prep["bottleneck.b"] = _bias_vector(w["bottleneck.bias"])
    prep["out"] = _gemm_matrix(w["out.weight"][:, :, 0, 0].t())  # (64, 3)
    prep["out.b"] = _bias_vector(w["out.bias"])
    return prep


def prepare_backward(weights, bottleneck_taps):
    w = dict(zip(HEAD_WEIGHT_NAMES, weights))
    prep = {}
    for level in range(1, 5):
        wt = w[f"enc{level}.weight"]
        if level == 1:
            wt = F.pad(wt, (0, 0, 0, 0, 0, IN_PAD - wt.shape[1]))
        prep[f"enc{level}"] = _conv3_dgrad_matrix(wt)
        prep[f"dec{level}"] = _conv3_dgrad_matrix(w[f"dec{level}.weight"])
        up = w[f"up{level}.weight"]  # (ci, co, 2, 2) -> B[(dy, dx, co), ci]
        ci, co = up.shape[:2]
        prep[f"up{level}"] = _gemm_matrix(up.permute(2, 3, 1, 0).reshape(4 * co, ci))
    wb = w["bottleneck.weight"][:, :, 0, 0]
    c4 = ENCODER_CHANNELS[-1]
    prep["bottleneck.pooled"] = _gemm_matrix(wb[:, :c4])  # B[co, ci]
    # The token is broadcast over the bottleneck grid, so its gradient sums the grid: a gather of
    # all `taps` bottleneck pixels against the token weight repeated per tap.
    prep["bottleneck.token"] = _gemm_matrix(wb[:, c4:].repeat(bottleneck_taps, 1))
    wo = w["out.weight"][:, :, 0, 0]  # (3, 64): B[co (padded to 8), ci]
    prep["out"] = _gemm_matrix(F.pad(wo, (0, 0, 0, IN_PAD - wo.shape[0])))
    return prep


class _WeightCache:
    """Re-laid weights keyed on each weight's identity, data_ptr and version counter, so an in-place
    optimizer step or a new tensor at a recycled address is a miss, never a stale hit. Bypassed
    while a CUDA graph is being captured (see dip_kernels.backends.capturing): the capture records
    the re-layout itself, so every replay re-lays the weights as they are then."""

    def __init__(self, size=4):
        self.size = size
        self.entries = []  # (refs, stamps, kind, prepared)

    @staticmethod
    def _stamp(t):
        try:
            version = t._version
        except RuntimeError:  # inference tensors track no version: never cache them
            return None
        return (t.data_ptr(), version, t.dtype, t.device)

    def get(self, weights, kind, build):
        if capturing(weights[0]):
            with torch.no_grad():
                return build()
        stamps = [self._stamp(t) for t in weights]
        if all(s is not None for s in stamps):
            for refs, old, k, prepared in self.entries:
                if k == kind and old == stamps and all(r() is t for r, t in zip(refs, weights)):
                    return prepared
        with torch.no_grad():
            prepared = build()
        if all(s is not None for s in stamps):
            self.entries.insert(0, ([weakref.ref(t) for t in weights], stamps, kind, prepared))
            del self.entries[self.size:]
        return prepared


_cache = _WeightCache()


# ---------------------------------------------------------------- the compiled building blocks
class CudaOps:
    """Thin calls into torch.ops.dip_C (looked up lazily, so this module imports without _C)."""

    @staticmethod
    def conv_gemm(out, src1, src2, wgemm, bias, aux, pooled, ks, stride, pad, pool_order, act, upsample):
        torch.ops.dip_C.pd_conv_gemm_(out, src1, src2, wgemm, bias, aux, pooled, ks, stride, pad, pool_order, act,
                                      upsample)

    @staticmethod
    def wgrad_partial(partial, a, src1, src2, ks, stride, pad):
        torch.ops.dip_C.pd_wgrad_partial_(partial, a, src1, src2, ks, stride, pad)

    @staticmethod
    def colsum_partial(partial, x):
        torch.ops.dip_C.pd_colsum_partial_(partial, x)

    @staticmethod
    def grad_finalize(out, partial, ctot):
        torch.ops.dip_C.pd_grad_finalize_(out, partial, ctot)

    @staticmethod
    def pool_silu_backward(dz, h, z, dskip, dpooled):
        torch.ops.dip_C.pd_pool_silu_backward_(dz, h, z, dskip, dpooled)

    @staticmethod
    def target_blocks(device):
        # splits depend on the card only, so results are bitwise reproducible on one card
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------- forward schedule
def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def pack_image(x):
    """(M, 3, P, P) -> channels-last (M, P, P, 8), channels 3..7 zero."""
    m, c, p, _ = x.shape
    out = torch.zeros((m, p, p, IN_PAD), dtype=x.dtype, device=x.device)
    out[..., :c] = x.permute(0, 2, 3, 1)
    return out


def run_forward(patches, tokens, prep, ops, keep):
    """The head's forward. keep=True also returns every tensor the backward needs (with the SiLU
    pre-activations z); keep=False stores no z and drops activations as soon as possible."""
    m, _, size, _ = patches.shape
    d = tokens.shape[1]
    acts = {}
    h = pack_image(patches)
    acts["x"] = h
    for level in range(1, 5):
        c = ENCODER_CHANNELS[level - 1]
        skip = _empty((m, size, size, c), patches)
        z = torch.empty_like(skip) if keep else None
        pooled = _empty((m, size // 2, size // 2, c), patches)
        ops.conv_gemm(skip, h, None, prep[f"enc{level}"], prep[f"enc{level}.b"], z, pooled, 3, 1, 1, True,
                      ACT_SILU, False)
        acts[f"h{level}"], acts[f"z{level}"], acts[f"p{level}"] = skip, z, pooled
        h, size = pooled, size // 2
    c4 = ENCODER_CHANNELS[-1]
    token_grid = tokens[:, None, None, :].expand(m, size, size, d)
    hb = _empty((m, size, size, c4), patches)
    zb = torch.empty_like(hb) if keep else None
    ops.conv_gemm(hb, h, token_grid, prep["bottleneck"], prep["bottleneck.b"], zb, None, 1, 1, 0, False, ACT_SILU,
                  False)
    acts["hb"], acts["zb"] = hb, zb
    h = hb
    for j, level in enumerate(range(4, 0, -1)):
        cu = h.shape[3]
        u = _empty((m, 2 * size, 2 * size, cu), patches)
        ops.conv_gemm(u, h, None, prep[f"up{level}"], prep[f"up{level}.b"], None, None, 1, 1, 0, False, ACT_NONE, True)
        size *= 2
        hd = _empty((m, size, size, DECODER_CHANNELS[j]), patches)
        zd = torch.empty_like(hd) if keep else None
        ops.conv_gemm(hd, u, acts[f"h{level}"], prep[f"dec{level}"], prep[f"dec{level}.b"], zd, None, 3, 1, 1,
                      False, ACT_SILU, False)
        acts[f"u{level}"], acts[f"hd{level}"], acts[f"zd{level}"] = u, hd, zd
        if not keep:
            acts[f"h{level}"] = None
        h = hd
    out = output_buffer((m, 3, size, size), patches.dtype, patches.device)
    ops.conv_gemm(out.permute(0, 2, 3, 1), h, None, prep["out"], prep["out.b"], None, None, 1, 1, 0, False, ACT_NONE,
                  False)
    return out, acts


# ---------------------------------------------------------------- backward schedule
def _splits(rows, tiles, target_blocks):
    return max(1, min(65535, -(-rows // MIN_ROWS_PER_SPLIT), -(-target_blocks // max(tiles, 1))))


def _weight_grad(ops, out3, a, src1, src2, ks, stride, pad, target_blocks):
    """out3 (M, C, taps) contiguous view of a weight gradient, = sum over pixels of a[p, m] x the
    (tap, c) gather of concat(src1, src2)."""
    mw = a.shape[3]
    ctot = src1.shape[3] + (src2.shape[3] if src2 is not None else 0)
    k = ks * ks * ctot
    mpad, npad = _round_up(mw, WG_BM), _round_up(k, WG_BN)
    rows = a.shape[0] * a.shape[1] * a.shape[2]
    splits = _splits(rows, (mpad // WG_BM) * (npad // WG_BN), target_blocks)
    partial = torch.empty((splits, mpad, npad), dtype=torch.float32, device=a.device)
    ops.wgrad_partial(partial, a, src1, src2, ks, stride, pad)
    ops.grad_finalize(out3, partial, ctot)


def _bias_grad(ops, out, x, target_blocks):
    """out (C,) = column sums of the channels-last view x (whose channel count may exceed C)."""
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    chunks = _splits(rows, -(-x.shape[3] // 64), target_blocks)
    partial = torch.empty((chunks, x.shape[3]), dtype=torch.float32, device=x.device)
    ops.colsum_partial(partial, x)
    ops.grad_finalize(out.view(1, -1, 1), partial.view(chunks, 1, x.shape[3]), x.shape[3])


def run_backward(grad_out, patches, tokens, weights, prep_f, prep_b, ops, target_blocks):
    _, acts = run_forward(patches, tokens, prep_f, ops, keep=True)
    w = dict(zip(HEAD_WEIGHT_NAMES, weights))
    grads = {name: output_buffer(w[name].shape, w[name].dtype, w[name].device) for name in HEAD_WEIGHT_NAMES}

    def wgrad(name, a, src1, src2, ks, stride, pad):
        g = grads[name]
        _weight_grad(ops, g.view(g.shape[0], g.shape[1], -1), a, src1, src2, ks, stride, pad, target_blocks)

    m, _, size, _ = patches.shape
    g8 = pack_image(grad_out)
    # output conv 64 -> 3 (1x1): A operand = grad_out padded to 8 channels
    hd1 = acts["hd1"]
    out_w = grads["out.weight"]
    _weight_grad(ops, out_w.view(out_w.shape[0], out_w.shape[1], 1), g8, hd1, None, 1, 1, 0, target_blocks)
    _bias_grad(ops, grads["out.bias"], g8, target_blocks)
    dz = torch.empty_like(hd1)
    ops.conv_gemm(dz, g8, None, prep_b["out"], None, acts["zd1"], None, 1, 1, 0, False, ACT_SILU_BACKWARD, False)
    del g8

    dcat = {}
    for j, level in enumerate(range(1, 5)):
        # decoder conv of `level`: input concat(u, skip h), output dz (its pre-activation grad)
        u, skip = acts[f"u{level}"], acts[f"h{level}"]
        wgrad(f"dec{level}.weight", dz, u, skip, 3, 1, 1)
        _bias_grad(ops, grads[f"dec{level}.bias"], dz, target_blocks)
        cu = u.shape[3]
        d_cat = _empty((m, size, size, cu + skip.shape[3]), patches)
        ops.conv_gemm(d_cat, dz, None, prep_b[f"dec{level}"], None, None, None, 3, 1, 1, False, ACT_NONE, False)
        dcat[level] = d_cat
        d_up = d_cat[..., :cu]
        # transposed conv of `level`: input = the previous decoder output (or the bottleneck)
        prev_h, prev_z = (acts[f"hd{level + 1}"], acts[f"zd{level + 1}"]) if level < 4 else (acts["hb"], acts["zb"])
        wgrad(f"up{level}.weight", prev_h, d_up, None, 2, 2, 0)
        _bias_grad(ops, grads[f"up{level}.bias"], d_up, target_blocks)
        dz = torch.empty_like(prev_h)
        ops.conv_gemm(dz, d_up, None, prep_b[f"up{level}"], None, prev_z, None, 2, 2, 0, False, ACT_SILU_BACKWARD,
                      False)
        size //= 2

    # bottleneck 1x1 over concat(p4, token grid); dz is its pre-activation gradient
    p4 = acts["p4"]
    bsize = p4.shape[1]
    d = tokens.shape[1]
    token_grid = tokens[:, None, None, :].expand(m, bsize, bsize, d)
    wgrad("bottleneck.weight", dz, p4, token_grid, 1, 1, 0)
    _bias_grad(ops, grads["bottleneck.bias"], dz, target_blocks)
    d_pooled = torch.empty_like(p4)
    ops.conv_gemm(d_pooled, dz, None, prep_b["bottleneck.pooled"], None, None, None, 1, 1, 0, False, ACT_NONE, False)
    g_tokens = output_buffer(tokens.shape, tokens.dtype, tokens.device)
    ops.conv_gemm(g_tokens[:, None, None, :], dz, None, prep_b["bottleneck.token"], None, None, None, bsize, bsize, 0,
                  False, ACT_NONE, False)

    g_patches = None
    for level in range(4, 0, -1):
        h, z = acts[f"h{level}"], acts[f"z{level}"]
        c = h.shape[3]
        dz = torch.empty_like(h)
        d_cat = dcat.pop(level)
        ops.pool_silu_backward(dz, h, z, d_cat[..., d_cat.shape[3] - c:], d_pooled)
        del d_cat
        src = acts[f"p{level - 1}"] if level > 1 else acts["x"]
        wgrad(f"enc{level}.weight", dz, src, None, 3, 1, 1)
        _bias_grad(ops, grads[f"enc{level}.bias"], dz, target_blocks)
        if level > 1:
            d_pooled = torch.empty_like(src)
            ops.conv_gemm(d_pooled, dz, None, prep_b[f"enc{level}"], None, None, None, 3, 1, 1, False, ACT_NONE, False)
        else:
            g_patches = output_buffer(patches.shape, patches.dtype, patches.device)
            ops.conv_gemm(g_patches.permute(0, 2, 3, 1), dz, None, prep_b["enc1"], None, None, None, 3, 1, 1, False,
                          ACT_NONE, False)
    return g_patches, g_tokens, [grads[name] for name in HEAD_WEIGHT_NAMES]


# ---------------------------------------------------------------- backend entry points
def _aligned(t):
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_supported(patches, tokens):
    problem = unsupported(patches, tokens)
    if problem:  # dip_kernels.backends never sends such inputs here
        raise ValueError(problem)


def patch_detailer_forward(patches, tokens, weights):
    _check_supported(patches, tokens)
    weights = list(weights)
    prep = _cache.get(weights, "fwd", lambda: prepare_forward(weights))
    out, _ = run_forward(_aligned(patches), _aligned(tokens), prep, CudaOps, keep=False)
    return out


def patch_detailer_backward(grad_out, patches, tokens, weights):
    _check_supported(patches, tokens)
    weights = list(weights)
    taps = (patches.shape[2] // 16) ** 2
    prep_f = _cache.get(weights, "fwd", lambda: prepare_forward(weights))
    prep_b = _cache.get(weights, ("bwd", taps), lambda: prepare_backward(weights, taps))
    return run_backward(_aligned(grad_out.to(patches.dtype)), _aligned(patches), _aligned(tokens), weights, prep_f,
                        prep_b, CudaOps, CudaOps.target_blocks(patches.device))


__all__ = ["patch_detailer_forward", "patch_detailer_backward", "run_forward", "run_backward", "prepare_forward",
           "prepare_backward", "CudaOps", "unsupported"]
