"""The torch executor of the Patch Detailer Head plan (dip_kernels/plan/patch_detailer.py): every
step of the plan as torch ops on channels-last tensors, on any device.

Each Conv step is literally its implicit GEMM: the im2col gather of its sources (``columns``: K
ordered (tap, channel), windows zero-padded per patch) times the plan's re-laid weight, in float32
(float64 for float64 tensors) as the kernels accumulate, then the same epilogue the kernels apply,
stored in the tensors' dtype. So it runs the very schedule, re-layouts and views the Triton and
CUDA executors run, and is tested against the reference (tests/test_patch_detailer.py); ``implicit_gemm`` also takes the CUDA kernels' tile-padded operands, which
lets tests run the CUDA executor's lowering on CPU (tests/test_patch_detailer_cuda.py).

It is not a backend: the reference is what auto runs on a CPU, and the onednn backend
(dip_kernels/onednn) is the detailer's fast CPU schedule.
"""
import torch
import torch.nn.functional as F

from . import patch_detailer as plan
from .patch_detailer import Executor


def compute_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def columns(sources, ks, stride, pad, size, dtype):
    """[rows, K] im2col of channels-last sources (channels concatenated), rows (patch, y, x) on a
    size x size grid, K ordered (ky, kx, channel)."""
    x = torch.cat([s.to(dtype) for s in sources], -1) if len(sources) > 1 else sources[0].to(dtype)
    m, c = x.shape[0], x.shape[3]
    if ks == 1 and stride == 1:
        return x.reshape(m * size * size, c)
    x = F.pad(x, (0, 0, pad, pad, pad, pad))
    x = x.unfold(1, ks, stride).unfold(2, ks, stride)  # (M, size, size, C, ky, kx)
    return x.permute(0, 1, 2, 4, 5, 3).reshape(m * size * size, ks * ks * c)


def unpool(g, skip):
    """The 2x2 max-pool backward: g (M, S, S, N) to the first maximum, in scan order, of each
    window of skip (M, 2S, 2S, N), as torch's max_pool2d backward routes it."""
    m, s, _, n = g.shape
    windows = skip.reshape(m, s, 2, s, 2, n).permute(0, 1, 3, 5, 2, 4).reshape(m, s, s, n, 4)
    routed = F.one_hot(windows.argmax(-1), 4).to(g.dtype) * g[..., None]
    return routed.reshape(m, s, s, n, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(m, 2 * s, 2 * s, n)


def implicit_gemm(out, sources, weight, bias, ks, stride, pad, size, *, silu=False, z=None, dsilu=False,
                  pool=None, upsample=False):
    """One Conv step into ``out`` (one tensor, or two splitting the columns): the GEMM of the
    sources' columns with ``weight`` [K or more rows, N or more columns] (rows and columns past the
    columns' K and the outputs' N are tile padding), its bias and epilogue."""
    ct = compute_dtype(sources[0])
    cols = columns(sources, ks, stride, pad, size, ct)
    n = sum(o.shape[3] for o in out) * (4 if upsample else 1)
    acc = cols @ weight[:cols.shape[1], :n].to(ct)
    if bias is not None:
        acc = acc + bias[:n].to(ct)
    m = sources[0].shape[0]
    acc = acc.view(m, size, size, n)
    if silu:
        if z is not None:
            z.copy_(acc)
        acc = F.silu(acc)
    if dsilu:
        acc = acc * silu_grad(z.to(ct))
    if pool is not None:
        pool.copy_(acc.view(m, size // 2, 2, size // 2, 2, n).amax((2, 4)))
    if upsample:  # column (dy, dx, c) of input pixel (y, x) is output pixel (2y+dy, 2x+dx)
        c = n // 4
        acc = acc.view(m, size, size, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(m, 2 * size, 2 * size, c)
    start = 0
    for o in out:
        o.copy_(acc[..., start:start + o.shape[3]])
        start += o.shape[3]
    return acc


class TorchExecutor(Executor):
    """The plan on torch ops (sources and outputs are channels-last tensors and views)."""
    name = "torch"

    def conv(self, step, out, sources, weight, bias, z=None, pool=None, pool_grad=None, whole=None):
        if pool_grad is not None:
            skip, zskip, gskip = pool_grad
            ct = compute_dtype(skip)
            g = torch.empty((skip.shape[0], step.size, step.size, skip.shape[3]), dtype=ct, device=skip.device)
            implicit_gemm([g], sources, weight, None, step.ks, step.stride, step.pad, step.size)
            out[0].copy_((gskip.to(ct) + unpool(g, skip)) * silu_grad(zskip.to(ct)))
            return
        implicit_gemm(out, sources, weight, bias, step.ks, step.stride, step.pad, step.size, silu=step.silu, z=z,
                      dsilu=step.dsilu is not None, pool=pool, upsample=step.upsample)

    def weight_grad(self, step, grad_weight, grad_bias, grad, sources):
        ct = compute_dtype(grad)
        if step.transposed:  # dW[ci, (dy, dx, co)]: the input's rows against the output gradient's 2x2 blocks
            ci, co = grad_weight.shape[:2]
            rows = sources[0].to(ct).reshape(-1, ci)
            dw = rows.t() @ columns([grad], 2, 2, 0, step.size, ct)
            grad_weight.copy_(dw.view(ci, 2, 2, co).permute(0, 3, 1, 2))
        else:  # dW[(ky, kx, c), co]
            co, ci, k, _ = grad_weight.shape
            g = grad.to(ct).reshape(-1, co)
            dw = columns(sources, step.ks, 1, step.pad, step.size, ct).t() @ g
            grad_weight.copy_(dw.view(k, k, ci, co).permute(3, 2, 0, 1))
        grad_bias.copy_(grad.to(ct).reshape(-1, grad.shape[3]).sum(0))


EXECUTOR = TorchExecutor()


def patch_detailer_forward(patches, tokens, weights):
    return plan.forward(EXECUTOR, patches, tokens, weights)


def patch_detailer_backward(grad_out, patches, tokens, weights):
    return plan.backward(EXECUTOR, grad_out, patches, tokens, weights)
