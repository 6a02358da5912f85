"""CUDA executor of the Patch Detailer Head plan: each step of dip_kernels/plan/patch_detailer.py
lowered onto the compiled building blocks torch.ops.dip_C.patch_detailer_* (csrc/patch_detailer.cpp,
csrc/cuda/patch_detailer.cu). Activations are channels-last (N, H, W, C); see the comment at the
top of the .cu for the GEMM views and the recompute-vs-store memory budget.

Lowering: a Conv step is one ``conv_gemm`` (a pool_grad epilogue: the GEMM into the pooled map's
gradient, then ``pool_silu_backward``); a WeightGrad step is ``wgrad_partial`` + ``grad_finalize``
for the weight and ``colsum_partial`` + ``grad_finalize`` for the bias, split over rows
(``row_splits`` with two blocks per SM: bitwise reproducible on one card). The kernels gather 16
bytes at a time and read whole tiles, so the GEMM operands are the plan's re-layouts zero-padded:
every tap's channels to a multiple of 8 (the 3-channel images are packed to 8 channels too), K to
a multiple of BK and N of CONV_BN; biases float32.

bf16 and fp16 run on the kernels. CAPABILITY declines float32 / float64 inputs and token widths
that are not a multiple of 8 (tensor-core only, 16-byte gathers); dip_kernels.backends then picks
another backend, visibly (``dip_kernels.explain``).
"""
import torch
import torch.nn.functional as F

from ..backends import Capability
from ..plan import patch_detailer as plan
from ..plan.patch_detailer import Executor

# Tile sizes of the kernels (must match csrc/cuda/patch_detailer.cu).
BK = 32          # K depth of a stage: GEMM weight matrices are padded to a multiple of it
CONV_BN = 64     # conv output-channel tile: weight matrices padded to a multiple of it
WG_BM = 64       # wgrad tiles
WG_BN = 64
ACT_NONE, ACT_SILU, ACT_SILU_BACKWARD = 0, 1, 2
IN_PAD = 8       # channels per 16-byte gather: the 3 image channels are padded to 8
MIN_ROWS_PER_SPLIT = 256

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _token_width(patches, tokens=None, *_):
    if tokens is not None and tokens.shape[1] % 8:
        return f"the CUDA detailer kernels need a token width divisible by 8, got {tokens.shape[1]}"
    return None


CAPABILITY = Capability(
    devices=("cuda",), dtypes=KERNEL_DTYPES, limits=_token_width,
    dtype_reason=lambda dtype: f"the CUDA detailer kernels are tensor-core only (bfloat16, float16), got {dtype}")


def _round_up(x, m):
    return (x + m - 1) // m * m


class DipC:
    """The compiled building blocks (looked up on call, so this module imports without _C)."""

    @staticmethod
    def conv_gemm(out, src1, src2, wgemm, bias, aux, pooled, ks, stride, pad, pool_order, act, upsample):
        torch.ops.dip_C.patch_detailer_conv_gemm_(out, src1, src2, wgemm, bias, aux, pooled, ks, stride, pad,
                                                  pool_order, act, upsample)

    @staticmethod
    def wgrad_partial(partial, a, src1, src2, ks, stride, pad):
        torch.ops.dip_C.patch_detailer_wgrad_partial_(partial, a, src1, src2, ks, stride, pad)

    @staticmethod
    def colsum_partial(partial, x):
        torch.ops.dip_C.patch_detailer_colsum_partial_(partial, x)

    @staticmethod
    def grad_finalize(out, partial, ctot):
        torch.ops.dip_C.patch_detailer_grad_finalize_(out, partial, ctot)

    @staticmethod
    def pool_silu_backward(dz, h, z, dskip, dpooled):
        torch.ops.dip_C.patch_detailer_pool_silu_backward_(dz, h, z, dskip, dpooled)

    @staticmethod
    def target_blocks(device):
        # splits depend on the card only, so results are bitwise reproducible on one card
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _splits(rows, tiles, target_blocks):
    splits, _ = plan.row_splits(rows, tiles, programs=target_blocks, min_rows=MIN_ROWS_PER_SPLIT, round_up=True)
    return min(65535, splits)  # a grid dimension


def _aligned(t):
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class CudaExecutor(Executor):
    """The plan on ``kernels`` (DipC; tests pass a CPU model of the same contracts)."""
    name = "cuda"

    def __init__(self, kernels=DipC):
        self.kernels = kernels

    def inputs(self, patches, tokens, grad_out=None):
        problem = CAPABILITY.declines("cuda", (patches, tokens))
        if problem:  # dip_kernels.backends never sends such inputs here
            raise ValueError(problem)
        grad_out = _aligned(grad_out.to(patches.dtype)) if grad_out is not None else None
        return _aligned(patches), _aligned(tokens), grad_out

    def image(self, t):
        """(M, C, P, P) -> channels-last (M, P, P, 8), channels C..7 zero."""
        m, c, p, _ = t.shape
        out = torch.zeros((m, p, p, IN_PAD), dtype=t.dtype, device=t.device)
        out[..., :c] = t.permute(0, 2, 3, 1)
        return out

    def operand(self, layout, m, w):
        if layout.kind in ("bias", "up_bias"):
            v = m.float()
            return F.pad(v, (0, _round_up(v.numel(), CONV_BN) - v.numel())).contiguous()
        taps, c = layout.taps(w)
        if c % IN_PAD:
            m = F.pad(m.reshape(taps, c, -1), (0, 0, 0, _round_up(c, IN_PAD) - c)).reshape(-1, m.shape[1])
        k, n = m.shape
        return F.pad(m, (0, _round_up(n, CONV_BN) - n, 0, _round_up(k, BK) - k)).contiguous()

    def conv(self, step, out, sources, weight, bias, z=None, pool=None, pool_grad=None, whole=None):
        ops = self.kernels
        src1, src2 = sources[0], sources[1] if len(sources) > 1 else None
        if pool_grad is not None:
            skip, zskip, gskip = pool_grad
            d_pooled = self.empty((src1.shape[0], step.size, step.size, skip.shape[3]), src1)
            ops.conv_gemm(d_pooled, src1, None, weight, None, None, None, step.ks, step.stride, step.pad, False,
                          ACT_NONE, False)
            ops.pool_silu_backward(out[0], skip, zskip, gskip, d_pooled)
            return
        act = ACT_SILU if step.silu else ACT_SILU_BACKWARD if step.dsilu else ACT_NONE
        ops.conv_gemm(whole if whole is not None else out[0], src1, src2, weight, bias, z, pool, step.ks,
                      step.stride, step.pad, pool is not None, act, step.upsample)

    def weight_grad(self, step, grad_weight, grad_bias, grad, sources):
        ops, blocks = self.kernels, self.kernels.target_blocks(grad.device)
        if step.transposed:  # a = the input, gathered: the output's gradient (2x2, stride 2)
            a, src1, src2, stride = sources[0], grad, None, 2
        else:
            a, src1, src2, stride = grad, sources[0], sources[1] if len(sources) > 1 else None, 1
        out3 = grad_weight.view(grad_weight.shape[0], grad_weight.shape[1], -1)
        mw = a.shape[3]
        ctot = src1.shape[3] + (src2.shape[3] if src2 is not None else 0)
        mpad, npad = _round_up(mw, WG_BM), _round_up(step.ks * step.ks * ctot, WG_BN)
        rows = a.shape[0] * a.shape[1] * a.shape[2]
        splits = _splits(rows, (mpad // WG_BM) * (npad // WG_BN), blocks)
        partial = torch.empty((splits, mpad, npad), dtype=torch.float32, device=a.device)
        ops.wgrad_partial(partial, a, src1, src2, step.ks, stride, step.pad)
        ops.grad_finalize(out3, partial, ctot)
        # the bias: column sums of the output's gradient (whose channel count may exceed the bias's)
        rows = grad.shape[0] * grad.shape[1] * grad.shape[2]
        chunks = _splits(rows, -(-grad.shape[3] // 64), blocks)
        partial = torch.empty((chunks, grad.shape[3]), dtype=torch.float32, device=grad.device)
        ops.colsum_partial(partial, grad)
        ops.grad_finalize(grad_bias.view(1, -1, 1), partial.view(chunks, 1, grad.shape[3]), grad.shape[3])


EXECUTOR = CudaExecutor()


def patch_detailer_forward(patches, tokens, weights):
    return plan.forward(EXECUTOR, patches, tokens, weights)


def patch_detailer_backward(grad_out, patches, tokens, weights):
    return plan.backward(EXECUTOR, grad_out, patches, tokens, weights)
