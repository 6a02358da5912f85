"""The ``onednn`` backend of the Patch Detailer Head: the reference's math as a schedule of GEMMs and
oneDNN convolutions on channels-last activations, each layer in the form that measured fastest on CPU
(bench/test_bench_patch_detailer.py::test_patch_detailer_onednn_side_by_side times it against the reference).

Activations are NHWC tensors (M, S, S, C) between layers; the same memory viewed as NCHW is a
channels-last tensor, which is what oneDNN's fast convolutions take. Per layer:

* conv3x3 (pad 1) on a map of at most ``DENSE_MAX_SIZE`` (2x2: enc4 and dec4 at P=16): one dense
  GEMM [M, S*S*Ci] x [S*S*Ci, S*S*Co] whose weight matrix is the 3x3 kernel laid over every (input
  pixel, output pixel) pair. At 2x2 every pair is inside the kernel, so the GEMM does exactly the
  convolution's useful multiply-adds (16 Ci Co per patch, where nine taps are 36 Ci Co, five of
  them reading padding), in a shape MKL runs near its peak; oneDNN's direct convolution is at its
  slowest on such small maps (a third of its speed at 8x8, and worse in the backward).
* conv3x3 on larger maps: oneDNN (``F.conv2d`` / ``convolution_backward`` on channels-last views),
  bias fused.
* the bottleneck conv1x1 over concat(pooled, token): two GEMMs, the token's once per patch rather
  than once per bottleneck pixel; the concat is never built.
* ConvTranspose2d(2, stride 2): a per-pixel GEMM [rows, Ci] x [Ci, 4*Co], scattered straight into
  the decoder's concat buffer (upsampled | skip), which the next conv reads in place.
* the output conv1x1: a GEMM. SiLU and the 2x2 max-pool: ATen's vectorised kernels.

Weights are re-laid (the dense matrices, the transposed convs' GEMM layout) on every call, in
whole contiguous blocks: nothing is cached across calls,
because an optimizer may update weights in place without bumping their version counter (fused
AdamW does not), so a cache keyed on versions could serve stale weights.

Backward: the op saves only its inputs, so a backward would have to re-run the forward to get the
activations (the reference and Triton detailers do). Here the forward keeps what the backward needs (each
layer's input and pre-activation, the pools' argmax, the dense matrices) for the most recent call,
and a backward on the very same inputs (the same tensor objects, data pointers, shapes, strides
and version counters) takes it instead of recomputing; autograd always runs an op's backward after
its forward and before anything updates the saved inputs, so a training step runs one forward, not
two (a fifth of the detailer's time). One entry, forgotten when taken; calls where no input requires
grad (sampling) or of more than ``KEEP_MAX_PIXELS`` patch pixels (about 640 MiB of float32
activations) keep no activations, and a backward that finds nothing (or another call's)
recomputes. Then the schedule is walked back: SiLU derivative, input gradient and weight gradient
of every layer.

Any floating dtype runs (the GEMMs and oneDNN take them all); float32 is the one this exists for
(no bf16 units on the CPUs it was measured on). The reference stays the ground truth: this
backend runs only when chosen, ``set_backend("onednn", op="patch_detailer")``. (The detailer plan's torch
executor, dip_kernels/plan/patch_detailer_torch.py, runs the GPU kernels' schedule to test it; this
module is a schedule of its own, chosen for CPU speed.)
"""
import functools
import weakref

import torch
import torch.nn.functional as F

from .._alloc import output_buffer
from ..backends import Capability
from ..reference.patch_detailer import ENCODER_CHANNELS, DETAILER_WEIGHT_NAMES

_W = {name: i for i, name in enumerate(DETAILER_WEIGHT_NAMES)}
DENSE_MAX_SIZE = 2
LEVELS = (1, 2, 3, 4)
KEEP_MAX_PIXELS = 1 << 18  # M * P * P: 1024 patches of 16x16

# CPU tensors of any floating dtype and shape the op takes; auto never picks it (the reference
# stays what runs on a CPU unless asked for)
CAPABILITY = Capability(devices=("cpu",), auto_devices=())


def _nchw(x):
    """NHWC tensor -> the same memory as a channels-last NCHW tensor (no copy)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    """Channels-last NCHW tensor -> NHWC (contiguous: no copy when x is channels-last)."""
    return x.permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------- the dense form of a small conv3x3
@functools.lru_cache(None)
def dense_taps(size):
    """(S*S, S*S) int64: for a 3x3 conv (pad 1) on an S x S map, the kernel tap ky*3+kx that joins
    output pixel o to input pixel i ([o, i], pixels row-major), or 9 (a zero tap) when none does."""
    r = torch.arange(size)
    d = r[None, :] - r[:, None] + 1  # [y_out, y_in] -> ky
    ok = (d >= 0) & (d <= 2)
    tap = d[:, None, :, None] * 3 + d[None, :, None, :]  # [y_out, x_out, y_in, x_in]
    valid = ok[:, None, :, None] & ok[None, :, None, :]
    return torch.where(valid, tap, torch.full_like(tap, 9)).reshape(size * size, size * size)


@functools.lru_cache(None)
def dense_tap_pairs(size):
    """Per kernel tap, the (output pixels, input pixels) it joins on an S x S map."""
    taps = dense_taps(size)
    return [tuple((taps == k).nonzero().t()) for k in range(9)]


def dense_conv3_matrix(w, size):
    """conv3x3 weight (Co, Ci, 3, 3) -> its dense form transposed, [S*S*Co, S*S*Ci] (rows (output
    pixel, co), columns (input pixel, ci)): out_rows = in_rows @ matrix.t(). Assembled from whole
    per-tap (Co, Ci) blocks, so no step transposes Co against Ci."""
    co, ci = w.shape[:2]
    n = size * size
    taps = w.permute(2, 3, 0, 1).reshape(9, co, ci).contiguous()  # one pass: (Co*Ci, 9) -> (9, Co*Ci)
    matrix = w.new_empty(n, co, n, ci)
    for o, row in enumerate(dense_taps(size).tolist()):
        for i, k in enumerate(row):
            if k < 9:
                matrix[o, :, i].copy_(taps[k])
            else:
                matrix[o, :, i].zero_()
    return matrix.view(n * co, n * ci)


def dense_conv3_weight_grad(g_z, x, size):
    """Weight gradient (Co, Ci, 3, 3) of a dense conv step: per tap, one GEMM G^T X over the (patch,
    pixel pair) rows it joins (only pairs inside the kernel are multiplied), into a (9, Co, Ci)
    buffer; the final transposition to (Co, Ci, 3, 3) reads nine contiguous streams."""
    m, co, ci = x.shape[0], g_z.shape[-1], x.shape[-1]
    n = size * size
    g_pixels, x_pixels = g_z.reshape(m, n, co), x.reshape(m, n, ci)
    taps = g_z.new_empty(9, co, ci)
    for k, (out_px, in_px) in enumerate(dense_tap_pairs(size)):
        torch.mm(g_pixels[:, out_px].reshape(-1, co).t(), x_pixels[:, in_px].reshape(-1, ci), out=taps[k])
    return taps.permute(1, 2, 0).unflatten(2, (3, 3))


def _dense_matrices(weights, p):
    """The dense matrix of every conv3x3 whose map is at most DENSE_MAX_SIZE, by layer name."""
    out = {}
    for level in LEVELS:
        size = p >> (level - 1)
        if size <= DENSE_MAX_SIZE:
            for kind in ("enc", "dec"):
                out[f"{kind}{level}"] = dense_conv3_matrix(weights[_W[f"{kind}{level}.weight"]], size)
    return out


# ---------------------------------------------------------------- one layer, forward and backward
def _conv3(x, weights, dense, name):
    """Pre-activation of conv3x3 ``name`` (pad 1) on NHWC x."""
    b = weights[_W[f"{name}.bias"]]
    if name in dense:
        m, s = x.shape[:2]
        return torch.addmm(b.repeat(s * s), x.reshape(m, -1), dense[name].t()).view(m, s, s, -1)
    return _nhwc(F.conv2d(_nchw(x), weights[_W[f"{name}.weight"]], b, padding=1))


def _conv3_backward(g_z, x, weights, dense, name):
    """(input grad, weight grad (Co, Ci, 3, 3), bias grad) of conv3x3 ``name``."""
    co = g_z.shape[-1]
    if name in dense:
        m, s = x.shape[:2]
        g_x = (g_z.reshape(m, -1) @ dense[name]).view(x.shape)
        return g_x, dense_conv3_weight_grad(g_z, x, s), g_z.reshape(-1, co).sum(0)
    g_x, g_w, g_b = torch.ops.aten.convolution_backward(
        _nchw(g_z), _nchw(x), weights[_W[f"{name}.weight"]], [co], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, True, True])
    return _nhwc(g_x), g_w, g_b


def _pool(y, keep):
    """2x2 max-pool of NHWC y, and its argmax when the backward will need it."""
    if keep:
        pooled, indices = F.max_pool2d(_nchw(y), 2, return_indices=True)
        return _nhwc(pooled), indices
    return _nhwc(F.max_pool2d(_nchw(y), 2)), None


def _pool_backward(g_pooled, y, indices):
    return _nhwc(torch.ops.aten.max_pool2d_with_indices_backward(
        _nchw(g_pooled), _nchw(y), [2, 2], [2, 2], [0, 0], [1, 1], False, indices))


def _upsample_matrix(weights, level):
    """ConvTranspose2d weight (Ci, Co, 2, 2) -> [Ci, (dy, dx, Co)]: the output columns of one input
    pixel in the order its 2x2 block is stored channels-last."""
    w = weights[_W[f"up{level}.weight"]]
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], 4 * w.shape[1])


def _upsample_into(dst, x, weights, level):
    """ConvTranspose2d(2, stride 2) ``up{level}`` of NHWC x (M, S, S, Ci), written into dst
    (M, 2S, 2S, Co): a view of the concat buffer's first Co channels."""
    m, s, _, ci = x.shape
    u = torch.addmm(weights[_W[f"up{level}.bias"]].repeat(4), x.reshape(-1, ci), _upsample_matrix(weights, level))
    dst.unflatten(1, (s, 2)).unflatten(3, (s, 2)).copy_(u.view(m, s, s, 2, 2, -1).transpose(2, 3))


def _upsample_backward(g_up, x, weights, level):
    """(input grad (M, S, S, Ci), weight grad (Ci, Co, 2, 2), bias grad) of ``up{level}``; g_up is
    the gradient of its (M, 2S, 2S, Co) output."""
    m, s, _, ci = x.shape
    co = g_up.shape[-1]
    g = g_up.unflatten(1, (s, 2)).unflatten(3, (s, 2)).transpose(2, 3).reshape(m * s * s, 4 * co)
    g_w = (x.reshape(-1, ci).t() @ g).view(ci, 2, 2, co).permute(0, 3, 1, 2)
    return (g @ _upsample_matrix(weights, level).t()).view(m, s, s, ci), g_w, g.view(-1, co).sum(0)


# ---------------------------------------------------------------- the schedule
def _forward(patches, tokens, weights, dense, keep):
    """The detailer's output (M, P, P, 3) NHWC, and (when keep) what the backward needs."""
    m, _, p, _ = patches.shape
    saved = {}
    x = _nhwc(patches.contiguous(memory_format=torch.channels_last))
    skips = {}
    for level in LEVELS:
        name = f"enc{level}"
        z = _conv3(x, weights, dense, name)
        y = F.silu(z)
        pooled, indices = _pool(y, keep)
        if keep:
            saved[name] = (x, z, indices)
        skips[level] = y
        x = pooled
    c4 = ENCODER_CHANNELS[-1]
    w_b = weights[_W["bottleneck.weight"]][:, :, 0, 0]  # (C4, C4 + D): (pooled | token) columns
    b = x.shape[1]
    z_token = torch.addmm(weights[_W["bottleneck.bias"]], tokens, w_b[:, c4:].t())  # once per patch
    if b == 1:
        z = torch.addmm(z_token, x.reshape(m, -1), w_b[:, :c4].t()).view(m, 1, 1, -1)
    else:
        z = (x.reshape(m, b * b, -1) @ w_b[:, :c4].t()).add_(z_token.unsqueeze(1)).view(m, b, b, -1)
    if keep:
        saved["bottleneck"] = (x, z)
    y = F.silu(z)
    for level in reversed(LEVELS):
        skip = skips.pop(level)
        co_up = weights[_W[f"up{level}.weight"]].shape[1]
        cat = skip.new_empty(*skip.shape[:3], co_up + skip.shape[3])
        _upsample_into(cat[..., :co_up], y, weights, level)
        cat[..., co_up:].copy_(skip)
        z = _conv3(cat, weights, dense, f"dec{level}")
        if keep:
            saved[f"up{level}"] = y
            saved[f"dec{level}"] = (cat, z)
        y = F.silu(z)
    if keep:
        saved["out"] = y
    w_out = weights[_W["out.weight"]][:, :, 0, 0]
    return torch.addmm(weights[_W["out.bias"]], y.reshape(-1, y.shape[-1]), w_out.t()).view(m, p, p, -1), saved


def _backward(grad_out, patches, tokens, weights, dense, saved):
    m = patches.shape[0]
    grads = {}
    g = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
    w_out = weights[_W["out.weight"]][:, :, 0, 0]
    y = saved["out"]
    grads["out.weight"] = (g.t() @ y.reshape(-1, y.shape[-1]))[:, :, None, None]
    grads["out.bias"] = g.sum(0)
    g_y = (g @ w_out).view(y.shape)
    g_skips = {}
    for level in LEVELS:
        cat, z = saved[f"dec{level}"]
        g_cat, grads[f"dec{level}.weight"], grads[f"dec{level}.bias"] = _conv3_backward(
            torch.ops.aten.silu_backward(g_y, z), cat, weights, dense, f"dec{level}")
        co_up = weights[_W[f"up{level}.weight"]].shape[1]
        g_skips[level] = g_cat[..., co_up:]
        g_y, grads[f"up{level}.weight"], grads[f"up{level}.bias"] = _upsample_backward(
            g_cat[..., :co_up], saved[f"up{level}"], weights, level)
    pooled, z = saved["bottleneck"]
    c4 = ENCODER_CHANNELS[-1]
    w_b = weights[_W["bottleneck.weight"]][:, :, 0, 0]
    g_z = torch.ops.aten.silu_backward(g_y, z)
    g_rows = g_z.reshape(-1, g_z.shape[-1])
    g_token_z = g_z.reshape(m, -1, g_z.shape[-1]).sum(1)  # the token is broadcast over the bottleneck map
    grads["bottleneck.weight"] = torch.cat(
        [g_rows.t() @ pooled.reshape(-1, c4), g_token_z.t() @ tokens], dim=1)[:, :, None, None]
    grads["bottleneck.bias"] = g_token_z.sum(0)
    g_tokens = g_token_z @ w_b[:, c4:]
    g_x = (g_rows @ w_b[:, :c4]).view(pooled.shape)
    for level in reversed(LEVELS):
        x, z, indices = saved[f"enc{level}"]
        g_y = _pool_backward(g_x, z, indices).add_(g_skips.pop(level))
        g_x, grads[f"enc{level}.weight"], grads[f"enc{level}.bias"] = _conv3_backward(
            torch.ops.aten.silu_backward(g_y, z), x, weights, dense, f"enc{level}")
    g_patches = output_buffer(patches.shape, patches.dtype, patches.device).copy_(g_x.permute(0, 3, 1, 2))
    g_tokens = output_buffer(tokens.shape, tokens.dtype, tokens.device).copy_(g_tokens)
    g_weights = [output_buffer(w.shape, w.dtype, w.device).copy_(grads[name])
                 for name, w in zip(DETAILER_WEIGHT_NAMES, weights)]
    return g_patches, g_tokens, g_weights


# ---------------------------------------------------------------- the forward kept for its backward
class _LastForward:
    """What the most recent forward computed (dense matrices, and activations unless the call was
    too large), for a backward on the same inputs."""

    def __init__(self):
        self.stamps, self.kept = None, None

    @staticmethod
    def _stamps(tensors):
        try:
            return [(weakref.ref(t), t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in tensors]
        except RuntimeError:  # inference tensors carry no version counter: never kept
            return None

    def put(self, tensors, kept):
        self.stamps = self._stamps(tensors)
        self.kept = kept if self.stamps is not None else None

    def take(self, tensors):
        """What was kept for ``tensors`` (then forgotten), or None."""
        stamps, kept = self.stamps, self.kept
        self.stamps, self.kept = None, None
        now = self._stamps(tensors)
        if stamps is None or now is None or len(now) != len(stamps):
            return None
        for (ref, *key), (_, *key_now), t in zip(stamps, now, tensors):
            if ref() is not t or key != key_now:
                return None
        return kept


_last_forward = _LastForward()


def patch_detailer_forward(patches, tokens, weights):
    m, _, p, _ = patches.shape
    # worth keeping when a backward may follow: some input requires grad (a hint, not a guarantee:
    # only the stamps decide whether a backward may use what was kept)
    keep = m * p * p <= KEEP_MAX_PIXELS and any(t.requires_grad for t in (patches, tokens, *weights))
    with torch.no_grad():
        dense = _dense_matrices(weights, p)
        out, saved = _forward(patches, tokens, weights, dense, keep)
        _last_forward.put([patches, tokens, *weights], (dense, saved if keep else None))
        return output_buffer(patches.shape, patches.dtype, patches.device).copy_(out.permute(0, 3, 1, 2))


def patch_detailer_backward(grad_out, patches, tokens, weights):
    with torch.no_grad():
        dense, saved = _last_forward.take([patches, tokens, *weights]) or (None, None)
        if dense is None:
            dense = _dense_matrices(weights, patches.shape[-1])
        if saved is None:
            _, saved = _forward(patches, tokens, weights, dense, keep=True)
        return _backward(grad_out, patches, tokens, weights, dense, saved)
