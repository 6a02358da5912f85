"""The Patch Detailer Head as a plan: every layer of its forward and backward one GEMM step, derived
once from DETAILER_WEIGHT_NAMES and the channel tables (dip_kernels/reference/patch_detailer.py), and
one interpreter that runs the plan on an executor (Triton, the CUDA dip_C kernels, torch).

Activations are channels-last (M, S, S, C) between steps. A ``Conv`` step is an implicit GEMM over
(patch, pixel) rows: out[row, n] = sum over the ks x ks taps and the channels of its sources
(concatenated, never materialised) of source[patch, y*stride+ty-pad, x*stride+tx-pad, c] times
W[(tap, c), n], W a weight re-laid by its ``Layout``; then its epilogue: bias, SiLU (storing the
pre-activation z when the backward will need it), times silu'(z), the 2x2 max-pool of the result
(the encoder writes skip and pooled map at once), the transposed conv's 2x2 scatter (a
ConvTranspose2d(2, stride 2) is the per-pixel GEMM [rows, Cin] x [Cin, 4 Cout]), a split of the
output columns into two activations (the input gradient of a two-source conv), or the route of a
pooled map's gradient through the max-pool backward plus the skip's own gradient, times silu'(z).
A ``WeightGrad`` step is the GEMM [K, rows] x [rows, N] of a conv's weight and bias gradients,
split over rows by the executor (``row_splits``: fixed by the shape, hence deterministic).

An executor implements the primitives ``conv`` and ``weight_grad`` (and says how it views the op's
images and tokens and lays out a GEMM operand); ``forward`` / ``backward`` walk the plan, allocate
every activation, free each one after its last use, and fetch re-laid weights from the one weight
cache. The backward re-runs the forward (the op saves only its inputs) without the output conv.
Activation memory per patch, bf16, token dim 1152 (``activation_bytes_per_patch``):

* storing for backward what the backward needs (skips, pooled maps, upsampled maps, decoder and
  bottleneck outputs, and every SiLU's pre-activation): 295,936 B (289 KiB) at P=16,
  1,183,744 B (1,156 KiB) at P=32;
* recomputing (what the plan does): 0 B kept from forward to backward; the backward holds the same
  289 / 1,156 KiB plus ~62 / 246 KiB of gradient buffers while it runs, freeing each activation
  after its last use;
* the reference detailer under autograd keeps 422,656 B (413 KiB) at P=16 and 1,690,624 B (1,651 KiB)
  at P=32 from forward to backward (conv inputs incl. the materialised concats, SiLU inputs,
  pool inputs and int64 indices).

So between forward and backward the detailer holds no activations, and the backward's transient peak
stays below what the reference under autograd keeps alive across the whole step, for one extra forward (a third of the
step's FLOPs).

The weight cache keeps each re-laid weight for its source tensor: keyed on the tensor's identity,
address, version counter, dtype, shape and strides, and emptied by every torch.optim step (fused
optimizers update parameters without bumping their version counters). It is bypassed while a CUDA
graph is captured, so a graph re-lays the weights it replays with (an in-place optimizer step is
seen by the next replay, and no replay reads a cache entry that may be evicted and freed).
"""
import collections
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._alloc import output_buffer
from ..backends import capturing
from ..reference.patch_detailer import DECODER_CHANNELS, ENCODER_CHANNELS, DETAILER_WEIGHT_NAMES

SLOT = {name: i for i, name in enumerate(DETAILER_WEIGHT_NAMES)}
IMAGES = ("x", "g_out", "out", "g_x")   # the op's (M, 3, P, P) inputs and outputs
TOKENS = ("tokens", "g_tokens")          # the op's (M, D) token input and its gradient


# ---------------------------------------------------------------- weights as GEMM operands
@dataclass(frozen=True)
class Layout:
    """A detailer weight re-laid as a GEMM operand [K, N] (K ordered (tap, channel)), or a bias."""
    weight: str       # a DETAILER_WEIGHT_NAMES entry
    kind: str         # conv | conv_dgrad | up | up_dgrad | token_dgrad | bias | up_bias
    arg: int = 0      # conv_dgrad: the input channels kept; token_dgrad: the bottleneck's pixels

    def taps(self, w):
        """(taps, channels per tap) of K."""
        if self.kind == "conv":
            return w.shape[2] * w.shape[3], w.shape[1]
        if self.kind == "conv_dgrad":
            return w.shape[2] * w.shape[3], w.shape[0]
        if self.kind == "up":
            return 1, w.shape[0]
        if self.kind == "up_dgrad":
            return 4, w.shape[1]
        if self.kind == "token_dgrad":
            return self.arg, w.shape[0]
        raise ValueError(f"{self.kind} has no K")


def relayout(layout, w):
    """The GEMM operand of ``layout`` from its weight ``w`` (nn.Conv2d / ConvTranspose2d layouts)."""
    kind = layout.kind
    if kind == "conv":  # (Cout, Cin, k, k) -> [(ky, kx, cin), Cout]
        co, ci, k, _ = w.shape
        return w.permute(2, 3, 1, 0).reshape(k * k * ci, co)
    if kind == "conv_dgrad":  # the input gradient as a conv: the kernel flipped, channels swapped
        co, _, k, _ = w.shape
        return w[:, :layout.arg].flip(2, 3).permute(2, 3, 0, 1).reshape(k * k * co, layout.arg)
    if kind == "up":  # ConvTranspose2d (Cin, Cout, 2, 2) -> [Cin, (dy, dx, cout)]
        ci, co = w.shape[:2]
        return w.permute(0, 2, 3, 1).reshape(ci, 4 * co)
    if kind == "up_dgrad":  # its input gradient as a stride-2 2x2 conv: [(dy, dx, cout), cin]
        ci, co = w.shape[:2]
        return w.permute(2, 3, 1, 0).reshape(4 * co, ci)
    if kind == "token_dgrad":
        # the token is broadcast over the bottleneck's pixels, so its gradient sums them: the token
        # block of the bottleneck weight repeated per pixel, [(pixel, cout), D]
        c4 = ENCODER_CHANNELS[-1]
        return w[:, c4:, 0, 0].repeat(layout.arg, 1)
    if kind == "bias":
        return w
    if kind == "up_bias":  # one bias per output column (dy, dx, cout)
        return w.repeat(4)
    raise ValueError(f"unknown layout {kind!r}")


# ---------------------------------------------------------------- the steps
@dataclass(frozen=True)
class Conv:
    """One implicit GEMM with its epilogue (see the module docstring)."""
    name: str
    sources: Tuple[str, ...]            # activations read, channels concatenated
    out: Tuple[str, ...]                # one activation, or two when the output columns split
    weight: Layout
    size: int                           # the rows' grid: (M, size, size) rows
    ks: int
    stride: int = 1
    pad: int = 0
    bias: Optional[Layout] = None
    silu: bool = False
    z: Optional[str] = None             # silu: its pre-activation, stored when kept for a backward
    dsilu: Optional[str] = None         # multiply by silu'(this pre-activation)
    pool: Optional[str] = None          # also the 2x2 max-pool of the output
    upsample: bool = False              # columns (dy, dx, c) go to pixel (2y+dy, 2x+dx): output 2*size
    pool_grad: Optional[Tuple[str, str, str]] = None  # (skip, z, skip gradient): see the docstring;
    #                                                   output 2*size

    @property
    def out_size(self):
        return 2 * self.size if self.upsample or self.pool_grad else self.size


@dataclass(frozen=True)
class WeightGrad:
    """Weight and bias gradients of a conv (or, transposed, of a ConvTranspose2d(2, stride 2))."""
    weight: str                         # its weight's name; the bias is the next name
    grad: str                           # the gradient of its output (pre-activation)
    sources: Tuple[str, ...]            # its inputs
    size: int                           # the rows' grid: the output's (a conv) or the input's (transposed)
    ks: int
    transposed: bool = False

    @property
    def bias(self):
        return self.weight.replace(".weight", ".bias")

    @property
    def pad(self):
        return 0 if self.transposed else (self.ks - 1) // 2


def _enc_source(level):
    return "x" if level == 1 else f"p{level - 1}"


def _below(level):
    """The decoder input of up<level> and its pre-activation."""
    return ("b", "zb") if level == 4 else (f"d{level + 1}", f"zd{level + 1}")


def forward_plan(p):
    """The forward's steps for P x P patches."""
    steps = []
    for level, c in enumerate(ENCODER_CHANNELS, start=1):
        s = p >> (level - 1)
        steps.append(Conv(f"enc{level}", (_enc_source(level),), (f"s{level}",), Layout(f"enc{level}.weight", "conv"),
                          s, ks=3, pad=1, bias=Layout(f"enc{level}.bias", "bias"), silu=True, z=f"z{level}",
                          pool=f"p{level}"))
    steps.append(Conv("bottleneck", ("p4", "tokens"), ("b",), Layout("bottleneck.weight", "conv"), p >> 4, ks=1,
                      bias=Layout("bottleneck.bias", "bias"), silu=True, z="zb"))
    for level in range(4, 0, -1):
        s = p >> (level - 1)
        steps.append(Conv(f"up{level}", (_below(level)[0],), (f"u{level}",), Layout(f"up{level}.weight", "up"),
                          s // 2, ks=1, bias=Layout(f"up{level}.bias", "up_bias"), upsample=True))
        steps.append(Conv(f"dec{level}", (f"u{level}", f"s{level}"), (f"d{level}",),
                          Layout(f"dec{level}.weight", "conv"), s, ks=3, pad=1, bias=Layout(f"dec{level}.bias", "bias"),
                          silu=True, z=f"zd{level}"))
    steps.append(Conv("out", ("d1",), ("out",), Layout("out.weight", "conv"), p, ks=1, bias=Layout("out.bias", "bias")))
    return steps


def backward_plan(p):
    """The backward's steps (after a forward that kept its pre-activations)."""
    steps = [WeightGrad("out.weight", "g_out", ("d1",), p, ks=1),
             Conv("out.dgrad", ("g_out",), ("g_zd1",), Layout("out.weight", "conv_dgrad", DECODER_CHANNELS[-1]), p,
                  ks=1, dsilu="zd1")]
    for level in range(1, 5):
        s = p >> (level - 1)
        c_up, c_skip = _decoder_inputs(level)
        below, z_below = _below(level)
        g_below = "g_zb" if level == 4 else f"g_zd{level + 1}"
        steps += [WeightGrad(f"dec{level}.weight", f"g_zd{level}", (f"u{level}", f"s{level}"), s, ks=3),
                  Conv(f"dec{level}.dgrad", (f"g_zd{level}",), (f"g_u{level}", f"g_s{level}"),
                       Layout(f"dec{level}.weight", "conv_dgrad", c_up + c_skip), s, ks=3, pad=1),
                  WeightGrad(f"up{level}.weight", f"g_u{level}", (below,), s // 2, ks=2, transposed=True),
                  Conv(f"up{level}.dgrad", (f"g_u{level}",), (g_below,), Layout(f"up{level}.weight", "up_dgrad"),
                       s // 2, ks=2, stride=2, dsilu=z_below)]
    sb = p >> 4
    c4 = ENCODER_CHANNELS[-1]
    steps += [WeightGrad("bottleneck.weight", "g_zb", ("p4", "tokens"), sb, ks=1),
              Conv("bottleneck.token_dgrad", ("g_zb",), ("g_tokens",), Layout("bottleneck.weight", "token_dgrad", sb * sb),
                   1, ks=sb, stride=sb),
              Conv("bottleneck.dgrad", ("g_zb",), ("g_z4",), Layout("bottleneck.weight", "conv_dgrad", c4), sb, ks=1,
                   pool_grad=("s4", "z4", "g_s4"))]
    for level in range(4, 0, -1):
        s = p >> (level - 1)
        steps.append(WeightGrad(f"enc{level}.weight", f"g_z{level}", (_enc_source(level),), s, ks=3))
        c_in = 3 if level == 1 else ENCODER_CHANNELS[level - 2]
        dgrad = Layout(f"enc{level}.weight", "conv_dgrad", c_in)
        if level == 1:
            steps.append(Conv("enc1.dgrad", ("g_z1",), ("g_x",), dgrad, s, ks=3, pad=1))
        else:
            steps.append(Conv(f"enc{level}.dgrad", (f"g_z{level}",), (f"g_z{level - 1}",), dgrad, s, ks=3, pad=1,
                              pool_grad=(f"s{level - 1}", f"z{level - 1}", f"g_s{level - 1}")))
    return steps


def _decoder_inputs(level):
    """(upsampled, skip) channels of dec<level>."""
    c_up = ENCODER_CHANNELS[-1] if level == 4 else DECODER_CHANNELS[3 - level]
    return c_up, ENCODER_CHANNELS[level - 1]


def row_splits(rows, tiles, *, programs, min_rows, granule=1, round_up=False):
    """(splits, rows per split) of a weight-gradient GEMM over ``rows`` rows with ``tiles`` output
    tiles: about ``programs`` programs in all (each executor's count fills its device), at least
    ``min_rows`` rows per split, rows per split a multiple of ``granule``. Fixed by the shape and
    the executor alone, so the fp32 partials are summed in the same order every run."""
    per_tile = -(-programs // max(tiles, 1)) if round_up else programs // max(tiles, 1)
    splits = max(1, min(per_tile, -(-rows // min_rows)))
    return splits, -(-(-(-rows // splits)) // granule) * granule


# ---------------------------------------------------------------- the executor interface
class Executor:
    """What runs the plan: the primitives ``conv`` and ``weight_grad`` and how it views the op's
    tensors. Sources and outputs are the executor's own views (``act``, ``image``, ...) of the
    activations the interpreter allocates channels-last with ``empty``."""
    name = "executor"  # the weight cache's namespace

    def inputs(self, patches, tokens, grad_out=None):
        """The op's inputs as the kernels take them (e.g. aligned copies)."""
        return patches, tokens, grad_out

    def empty(self, shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def empty_split(self, shape, c1, like):
        """Two outputs splitting the channels of ``shape`` at c1: (first, second, whole or None)."""
        whole = self.empty(shape, like)
        return whole[..., :c1], whole[..., c1:], whole

    def act(self, t):
        """A channels-last activation as a source or output."""
        return t

    def image(self, t):
        """An (M, C, P, P) input of the op (the patches, the output's gradient) as a source."""
        return t.permute(0, 2, 3, 1)

    def token(self, t, size):
        """The (M, D) tokens as a source broadcast over a size x size map."""
        return t[:, None, None, :].expand(t.shape[0], size, size, t.shape[1])

    def image_out(self, t):
        return t.permute(0, 2, 3, 1)

    def token_out(self, t):
        return t[:, None, None, :]

    def operand(self, layout, m, w):
        """The executor's form of ``m``, weight ``w`` re-laid by ``layout`` (e.g. padded to its
        tiles); the cache keeps it."""
        return m.contiguous()

    def conv(self, step, out, sources, weight, bias, z=None, pool=None, pool_grad=None, whole=None):
        raise NotImplementedError

    def weight_grad(self, step, grad_weight, grad_bias, grad, sources):
        raise NotImplementedError


# ---------------------------------------------------------------- the one weight cache
class WeightCache:
    """Re-laid weights, each keyed on its source tensor's identity, address, version counter,
    dtype, shape and strides (so an in-place versioned update or a new tensor at a recycled address
    is a miss), emptied by every torch.optim optimizer step (fused optimizers write parameters
    without a version bump) and bypassed during CUDA-graph capture and for tensors without a version
    counter (inference tensors) or an address (meta)."""

    def __init__(self, size=256):
        self.size = size
        self.entries = collections.OrderedDict()  # key -> (weakref to the weight, re-laid tensor)

    @staticmethod
    def key(namespace, layout, w):
        if capturing(w) or w.device.type == "meta":
            return None
        try:
            version = w._version
        except RuntimeError:  # inference tensors track no version
            return None
        return (namespace, layout, w.data_ptr(), version, w.dtype, tuple(w.shape), w.stride(), w.device)

    def get(self, namespace, layout, w, build):
        key = self.key(namespace, layout, w)
        if key is not None:
            hit = self.entries.get(key)
            if hit is not None and hit[0]() is w:
                self.entries.move_to_end(key)
                return hit[1]
        with torch.no_grad():
            made = build(w)
        if key is not None:
            for dead in [k for k, (ref, _) in self.entries.items() if ref() is None]:
                del self.entries[dead]
            self.entries[key] = (weakref.ref(w), made)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return made

    def clear(self):
        self.entries.clear()


CACHE = WeightCache()
register_optimizer_step_post_hook(lambda optimizer, args, kwargs: CACHE.clear())


def operand(executor, layout, weights):
    """``layout`` of ``weights`` in ``executor``'s form, through the cache."""
    w = weights[SLOT[layout.weight]]
    return CACHE.get(executor.name, layout, w, lambda t: executor.operand(layout, relayout(layout, t), t))


# ---------------------------------------------------------------- the interpreter
def _reads(step):
    """The activations a step reads."""
    if isinstance(step, WeightGrad):
        return (step.grad,) + step.sources
    return step.sources + tuple(n for n in (step.dsilu,) if n) + tuple(step.pool_grad or ())


def _writes(step):
    """The activations a step writes (a Conv: with its pre-activation and pooled map)."""
    return () if isinstance(step, WeightGrad) else step.out + tuple(n for n in (step.z, step.pool) if n)


def _needed_steps(steps, needed):
    """The steps that ``needed`` depends on (the backward's forward skips the output conv)."""
    needed, kept = set(needed), []
    for step in reversed(steps):
        if needed & set(_writes(step)):
            kept.append(step)
            needed |= set(_reads(step))
    return kept[::-1]


def _last_uses(steps, keep=()):
    last = {n: i for i, step in enumerate(steps) for n in _reads(step)}
    last.update({n: len(steps) for n in keep})
    return last


class _Run:
    """One walk of the plan: the activations by name, as tensors and as the executor's views."""

    def __init__(self, ex, patches, tokens, weights):
        self.ex, self.weights = ex, weights
        self.m, self.p = patches.shape[0], patches.shape[2]
        self.like = patches
        self.env = {"x": ex.image(patches), "tokens": ex.token(tokens, self.p >> 4)}
        self.tensors = {}

    def source(self, name):
        return self.env[name] if name in IMAGES or name in TOKENS else self.ex.act(self.tensors[name])

    def new(self, name, size, channels):
        t = self.ex.empty((self.m, size, size, channels), self.like)
        self.tensors[name] = t
        return t

    def free(self, names):
        for n in names:
            self.tensors.pop(n, None)

    def run(self, steps, keep_z, outputs, keep=()):
        """Run ``steps``; ``outputs`` maps the op's output names to their buffers."""
        ex, last = self.ex, _last_uses(steps, keep)
        for i, step in enumerate(steps):
            if isinstance(step, WeightGrad):
                ex.weight_grad(step, outputs[step.weight], outputs[step.bias], self.source(step.grad),
                               [self.source(n) for n in step.sources])
            else:
                self._conv(step, keep_z, outputs)
            self.free([n for n, at in last.items() if at == i])

    def _conv(self, step, keep_z, outputs):
        ex = self.ex
        weight = operand(ex, step.weight, self.weights)
        bias = operand(ex, step.bias, self.weights) if step.bias is not None else None
        n = weight_columns(step, self.weights)
        whole = None
        name = step.out[0]
        if name in IMAGES:
            out = [ex.image_out(outputs[name])]
        elif name in TOKENS:
            out = [ex.token_out(outputs[name])]
        elif len(step.out) == 2:
            first, second, whole = ex.empty_split((self.m, step.size, step.size, n), _split_at(step), self.like)
            self.tensors[step.out[0]], self.tensors[step.out[1]] = first, second
            out = [ex.act(first), ex.act(second)]
        else:
            channels = n // 4 if step.upsample else n
            out = [ex.act(self.new(name, step.out_size, channels))]
        z = None
        if step.silu and keep_z:
            z = self.new(step.z, step.size, n)
        elif step.dsilu:
            z = self.tensors[step.dsilu]
        pool = self.new(step.pool, step.size // 2, n) if step.pool else None
        pool_grad = tuple(self.tensors[t] for t in step.pool_grad) if step.pool_grad else None
        ex.conv(step, out, [self.source(s) for s in step.sources], weight, bias, z=z, pool=pool,
                pool_grad=pool_grad, whole=whole)


def _split_at(step):
    """The split point of a decoder conv's input gradient: the upsampled map's channels."""
    level = int(step.name[3])
    return _decoder_inputs(level)[0]


def weight_columns(step, weights):
    """N of a Conv step's GEMM."""
    w = weights[SLOT[step.weight.weight]]
    kind = step.weight.kind
    if kind == "conv":
        return w.shape[0]
    if kind == "conv_dgrad":
        return step.weight.arg
    if kind == "up":
        return 4 * w.shape[1]
    if kind == "up_dgrad":
        return w.shape[0]
    return w.shape[1] - ENCODER_CHANNELS[-1]  # token_dgrad: D


def forward(ex, patches, tokens, weights):
    """The detailer's output (M, 3, P, P) on executor ``ex``."""
    patches, tokens, _ = ex.inputs(patches, tokens)
    run = _Run(ex, patches, tokens, weights)
    out = output_buffer(patches.shape, patches.dtype, patches.device)
    run.run(forward_plan(patches.shape[2]), keep_z=False, outputs={"out": out})
    return out


def backward(ex, grad_out, patches, tokens, weights):
    """(grad patches, grad tokens, [grad weights]) on executor ``ex``: the forward again, keeping
    what the backward steps read, then the backward steps."""
    patches, tokens, grad_out = ex.inputs(patches, tokens, grad_out)
    p = patches.shape[2]
    run = _Run(ex, patches, tokens, weights)
    bwd = backward_plan(p)
    needed = {n for step in bwd for n in _reads(step)}
    run.run(_needed_steps(forward_plan(p), needed), keep_z=True, outputs={}, keep=needed)
    grads = {name: output_buffer(w.shape, w.dtype, w.device) for name, w in zip(DETAILER_WEIGHT_NAMES, weights)}
    grads["g_x"] = output_buffer(patches.shape, patches.dtype, patches.device)
    grads["g_tokens"] = output_buffer(tokens.shape, tokens.dtype, tokens.device)
    run.env["g_out"] = ex.image(grad_out)
    run.run(bwd, keep_z=False, outputs=grads)
    return grads["g_x"], grads["g_tokens"], [grads[name] for name in DETAILER_WEIGHT_NAMES]



# ---------------------------------------------------------------- memory
def activation_bytes_per_patch(patch_size, token_dim, dtype_bytes=2):
    """(bytes the backward's recompute materialises per patch, bytes autograd of the reference saves per patch)."""
    sizes = [patch_size >> i for i in range(5)]
    ours = 0
    for level, c in enumerate(ENCODER_CHANNELS):
        s = sizes[level]
        ours += (2 * s * s + (s // 2) ** 2) * c  # skip, its pre-activation, pooled
    sb = sizes[4]
    ours += 2 * sb * sb * ENCODER_CHANNELS[-1]  # bottleneck and its pre-activation
    c_below = ENCODER_CHANNELS[-1]
    for level, c in zip(range(3, -1, -1), DECODER_CHANNELS):
        s = sizes[level]
        ours += s * s * c_below + 2 * s * s * c  # upsampled, decoder output and pre-activation
        c_below = c
    eager = 0
    for level, c in enumerate(ENCODER_CHANNELS):  # conv input, SiLU input, pool input + int64 indices
        s = sizes[level]
        c_in = 3 if level == 0 else ENCODER_CHANNELS[level - 1]
        eager += s * s * c_in + s * s * c + s * s * c + (s // 2) ** 2 * c * 8 / dtype_bytes
    eager += sb * sb * (ENCODER_CHANNELS[-1] + token_dim) + sb * sb * ENCODER_CHANNELS[-1]
    c_below = ENCODER_CHANNELS[-1]
    for level, c in zip(range(3, -1, -1), DECODER_CHANNELS):
        s = sizes[level]
        eager += (s // 2) ** 2 * c_below  # transposed conv input
        eager += s * s * (c_below + ENCODER_CHANNELS[level]) + s * s * c  # concat, SiLU input
        c_below = c
    eager += patch_size ** 2 * DECODER_CHANNELS[-1]  # output conv input
    return int(ours * dtype_bytes), int(eager * dtype_bytes)
