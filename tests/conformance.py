"""The conformance harness: each op's sample inputs, written once (as pytorch/extension-cpp's
sample_inputs), and the one comparison of a backend with the reference
(``check_against_reference``), which tests/test_backends.py runs on every backend and the per-op
test files use for their op-specific cases.

A Sample makes fresh random inputs (never zeros) of the custom op for a dtype and device. Every
op's catalogue holds a batch of 1, shape tails (sizes that are not a multiple of any tile),
non-contiguous inputs, and the sizes that take every split and tile path of the Triton kernels on
the CPU interpreter (the comments say which); ``CHECKS`` holds what each op's comparison needs.
"""
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import dip_kernels
from dip_kernels import backends
from dip_kernels.opspec import SPECS
from dip_kernels.reference.patch_detailer import DETAILER_WEIGHT_NAMES, detailer_weight_shapes
from dip_kernels.testing import assert_close_to_fp64, max_error, poisoned_allocations, ran_on, rms_error

EPS = 1e-6


@dataclass(frozen=True)
class Sample:
    name: str
    make: Callable  # make(dtype, device) -> the custom op's arguments
    slow: bool = False  # seconds of Triton interpreter: still in make test, marked slow
    dtypes: Tuple[torch.dtype, ...] = ()  # the CPU dtypes it runs in (default: its op's Check.dtypes)


@dataclass(frozen=True)
class Check:
    """How an op's results are compared with the reference."""
    half_factor: float = 2.0    # assert_close_to_fp64's factor in float16 / bfloat16
    half_error: Callable = max_error  # and its error measure there
    exact: bool = False         # a pure copy: bit for bit the reference
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float16)  # the CPU catalogue's
    gpu_dtypes: Tuple[torch.dtype, ...] = (torch.bfloat16,)


def _randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _other_half(dtype):
    """A weight dtype unlike the activations' (as under autocast: fp32 weights with half activations)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _transposed(t, a, b):
    """t's values with dims a, b's strides swapped (a non-contiguous layout of the same shape)."""
    return t.transpose(a, b).contiguous().transpose(a, b)


# ---------------------------------------------------------------- patchify / unpatchify
# (B, C, H, W, P): square and non-square images, P = 16, 32, a small even P and an odd one; the
# last two are wider than one tile of the copy kernel, the last tile partial (512-wide at P=32)
PATCHIFY_SHAPES = [(2, 3, 32, 48, 16), (1, 3, 64, 32, 32), (2, 5, 12, 20, 4), (1, 2, 15, 10, 5),
                   (1, 2, 32, 160, 32), (1, 1, 16, 272, 16)]


def image_layout(images, kind):
    if kind == "channels_last":
        return images.contiguous(memory_format=torch.channels_last)
    if kind == "transposed":  # H and W strides swapped
        return _transposed(images, 2, 3)
    if kind == "sliced":  # every other column of a wider image
        b, c, h, w = images.shape
        wide = torch.randn(b, c, h, 2 * w, dtype=images.dtype, device=images.device)
        wide[..., ::2] = images
        return wide[..., ::2]
    return images


def _patchify(shape, layout):
    b, c, h, w, p = shape

    def make(dtype, device):
        return image_layout(_randn(b, c, h, w, dtype=dtype, device=device), layout), p, None
    return make


def _unpatchify(shape, transposed):
    b, c, h, w, p = shape

    def make(dtype, device):
        tokens = _randn(b, (h // p) * (w // p), c * p * p, dtype=dtype, device=device)
        return (_transposed(tokens, 0, 1) if transposed else tokens), p, h, w, None
    return make


def _shape_id(shape):
    return "x".join(map(str, shape))


# ---------------------------------------------------------------- attention
def attention_inputs(b, h, n, d, dtype, device="cpu", weight_dtype=None, layout="contiguous"):
    """qkv with a non-unit scale, norm weights near but not at 1, the real 2D RoPE table."""
    width = 3 * h * d
    if layout == "row_padded":  # a slice of a fused projection's output
        qkv = _randn(b, n, width + 40, dtype=dtype, device=device, scale=1.5)[..., 8:8 + width]
    elif layout == "channel_strided":
        qkv = _randn(b, n, 2 * width, dtype=dtype, device=device, scale=1.5)[..., ::2]
    else:
        qkv = _randn(b, n, width, dtype=dtype, device=device, scale=1.5)
    weight_dtype = weight_dtype or dtype
    qw = (1 + 0.3 * torch.randn(d, device=device)).to(weight_dtype)
    kw = (1 + 0.3 * torch.randn(d, device=device)).to(weight_dtype)
    grid_h = int(math.isqrt(n))
    while n % grid_h:
        grid_h -= 1
    cos, sin = dip_kernels.rope_table(grid_h, n // grid_h, d, device=device)
    return qkv, qw, kw, cos, sin, h, EPS


def _attention(b, h, n, d, layout="contiguous"):
    # half-precision activations with float32 norm weights (as under autocast), float32 with float16
    # weights: the weight gradients come back in the weights' own dtype either way
    def make(dtype, device):
        return attention_inputs(b, h, n, d, dtype, device, _other_half(dtype), layout)
    return make


# ---------------------------------------------------------------- elementwise
# (B, N, D): N = 7 and a D that is no power of two; N = 37 with D = 1000 spans two partial-sum
# chunks, the second one partly masked; a batch of one
ELEMENTWISE_SHAPES = [(2, 7, 48), (2, 37, 1000), (3, 5, 300), (1, 3, 20)]


def rmsnorm_modulate_inputs(b, n, d, dtype, device="cpu", weight_dtype=None, noncontiguous=False):
    """x, weight, shift, scale (B, N, D): the weight near 1, shift and scale of scale 0.5."""
    x = _randn(b, n, d, dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(d, device=device)).to(weight_dtype or dtype)
    shift = _randn(b, d, dtype=dtype, device=device, scale=0.5)
    scale = _randn(b, d, dtype=dtype, device=device, scale=0.5)
    if noncontiguous:
        x = _transposed(x, 1, 2)
        weight = torch.stack([weight, torch.randn_like(weight)], -1)[:, 0]
        shift = torch.cat([shift, torch.randn_like(shift)], -1)[:, :d]
    return x, weight, shift, scale


def gated_residual_inputs(b, n, d, dtype, device="cpu", f_dtype=None, noncontiguous=False):
    """x, gate, f: the residual stream, its gate (B, D) and the branch output (in ``f_dtype``)."""
    x = _randn(b, n, d, dtype=dtype, device=device)
    gate = _randn(b, d, dtype=dtype, device=device)
    f = _randn(b, n, d, dtype=f_dtype or dtype, device=device)
    if noncontiguous:
        f = _transposed(f, 1, 2)
        gate = torch.cat([torch.randn_like(gate), gate], -1)[:, d:]
    return x, gate, f


def swiglu_input(shape, dtype, device="cpu", noncontiguous=False):
    """ab (..., 2H) of scale 2; non-contiguous: the first 2/3 of a wider projection's output."""
    if noncontiguous:
        h = shape[-1] // 2
        return _randn(*shape[:-1], 3 * h, dtype=dtype, device=device, scale=2.0)[..., :2 * h]
    return _randn(*shape, dtype=dtype, device=device, scale=2.0)


def _rmsnorm(b, n, d, noncontiguous):
    # float16 activations with a float32 weight, as under autocast; float32 ones written as float16
    def make(dtype, device):
        weight_dtype = torch.float32 if dtype == torch.float16 else dtype
        return (*rmsnorm_modulate_inputs(b, n, d, dtype, device, weight_dtype, noncontiguous), EPS,
                torch.float16 if dtype == torch.float32 else None)
    return make


def _gated(b, n, d, f_half, noncontiguous):
    def make(dtype, device):
        return gated_residual_inputs(b, n, d, dtype, device, torch.float16 if f_half else dtype, noncontiguous)
    return make


def _swiglu(shape, noncontiguous):
    def make(dtype, device):
        return (swiglu_input(shape, dtype, device, noncontiguous),)
    return make


# ---------------------------------------------------------------- patch detailer
def detailer_weights(token_dim, dtype=torch.float32, device="cpu"):
    """The detailer's layers with torch's default initialisation (activations stay O(1) through the
    head), biases widened so that they matter."""
    weights = []
    for name, shape in zip(DETAILER_WEIGHT_NAMES[::2], detailer_weight_shapes(token_dim)[::2]):
        if name.startswith("up"):
            layer = torch.nn.ConvTranspose2d(shape[0], shape[1], shape[2], stride=2)
        else:
            layer = torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2)
        weights += [layer.weight.detach(), layer.bias.detach() + 0.1 * torch.randn(layer.bias.shape)]
    return [w.to(device=device, dtype=dtype) for w in weights]


def detailer_inputs(m, p, d, dtype=torch.float32, device="cpu", layout="contiguous"):
    patches = _randn(m, 3, p, p, dtype=dtype, device=device)
    tokens = _randn(m, d, dtype=dtype, device=device)
    if layout == "strided":  # channels-last patches and tokens sliced from wider rows
        patches = patches.contiguous(memory_format=torch.channels_last)
        tokens = torch.cat([tokens, torch.randn_like(tokens)], 1)[:, :d]
    return patches, tokens, detailer_weights(d, dtype, device)


def _head(m, p, d, layout="contiguous"):
    def make(dtype, device):
        return detailer_inputs(m, p, d, dtype, device, layout)
    return make


# ---------------------------------------------------------------- the catalogue
SAMPLES: Dict[str, List[Sample]] = {
    "patchify": [Sample(f"{_shape_id(s)}-{layout}", _patchify(s, layout)) for s in PATCHIFY_SHAPES
                 for layout in ("contiguous", "channels_last", "transposed", "sliced")],
    "unpatchify": [Sample(f"{_shape_id(s)}-{'transposed' if t else 'contiguous'}", _unpatchify(s, t))
                   for s in PATCHIFY_SHAPES for t in (False, True)],
    # N = 100: a partial last key and query block; d = 72 (DiP-XL's) and 128 / 64 / 16; n = 256
    # spans several blocks of every config
    "attention": [Sample("1x2x100x72", _attention(1, 2, 100, 72)), Sample("2x2x16x64", _attention(2, 2, 16, 64)),
                  Sample("1x2x16x128", _attention(1, 2, 16, 128)), Sample("1x2x100x64", _attention(1, 2, 100, 64)),
                  Sample("1x1x256x72", _attention(1, 1, 256, 72)),
                  Sample("1x2x20x72-row_padded", _attention(1, 2, 20, 72, "row_padded")),
                  Sample("1x2x20x72-channel_strided", _attention(1, 2, 20, 72, "channel_strided"))],
    "rmsnorm_modulate": [Sample(f"{_shape_id(s)}{'-noncontiguous' if nc else ''}", _rmsnorm(*s, nc))
                         for s in ELEMENTWISE_SHAPES for nc in (False, True)],
    # float32 residual stream with a half-precision branch output, and the pure dtypes
    "gated_residual": [Sample(f"{_shape_id(s)}-{v}", _gated(*s, f_half, nc)) for s in ELEMENTWISE_SHAPES
                       for v, f_half, nc in (("same", False, False), ("half_f-noncontiguous", True, True),
                                             ("noncontiguous", False, True))],
    "swiglu": [Sample(f"{_shape_id(s)}{'-noncontiguous' if nc else ''}", _swiglu(s, nc))
               for s in [(2, 7, 96), (37, 2000), (2, 3, 5, 600), (6,), (1, 5, 40)] for nc in (False, True)],
    # the detailer's channel counts are fixed, so even one patch is seconds of interpreter: M=1 at
    # P=16 and 32; M=3 runs the weight gradient's row splits (several, the last partial) and
    # strided inputs; float16 at M=1
    "patch_detailer": [Sample("1x16x8", _head(1, 16, 8), slow=True, dtypes=(torch.float32,)),
                       Sample("3x16x32-strided", _head(3, 16, 32, "strided"), slow=True, dtypes=(torch.float32,)),
                       Sample("1x16x16", _head(1, 16, 16), slow=True, dtypes=(torch.float16,)),
                       Sample("1x32x8", _head(1, 32, 8), slow=True, dtypes=(torch.float32,))],
}

CHECKS: Dict[str, Check] = {
    "patchify": Check(exact=True),
    "unpatchify": Check(exact=True),
    # The kernel rounds P and dS to the input dtype for its tensor-core matmuls, as FA2 does; the
    # reference keeps them in float32. Over 200 fp16 cases (50 seeds x the first four samples) the
    # kernel's error reached 1.7x (out) and 2.2x (gradients) the reference's own error, which at
    # these small shapes is a noisy max; hence 3x in half precision
    "attention": Check(half_factor=3.0),
    "rmsnorm_modulate": Check(),
    "gated_residual": Check(),
    "swiglu": Check(),
    # The detailer's half-precision kernels round activations and partial sums to the dtype at other
    # points than the reference. At batch 1 (a few hundred elements per gradient) the largest
    # rounding error is a noisy statistic: over 100 fp16 seeds of sample 1x16x16 the Triton
    # kernel's max error reached 7.6x the reference's (CI hit 4.7x), while its RMS error stayed
    # within 1.6x over 40 seeds; so half precision compares RMS errors
    "patch_detailer": Check(half_error=rms_error),
}


def error_measure(op, dtype):
    """How ``op``'s error against fp64 is measured in ``dtype`` (see CHECKS)."""
    return CHECKS[op].half_error if dtype in (torch.float16, torch.bfloat16) else max_error


def cases(op, dtypes=None):
    """pytest params (dtype, sample) of op's catalogue; slow samples marked slow."""
    return [pytest.param(dtype, s, id=f"{str(dtype)[6:]}-{s.name}", marks=[pytest.mark.slow] if s.slow else [])
            for s in SAMPLES[op] for dtype in (dtypes or s.dtypes or CHECKS[op].dtypes)]


# small inputs for torch.library.opcheck, which runs an op several times (and its backward)
OPCHECK = {
    "patchify": [lambda d: (torch.randn(2, 3, 8, 12, device=d), 4, None),
                 lambda d: (torch.randn(2, 3, 8, 12, device=d), 4, torch.float16)],
    "unpatchify": [lambda d: (torch.randn(2, 6, 3 * 16, device=d), 4, 8, 12, None),
                   lambda d: (torch.randn(2, 6, 3 * 16, device=d), 4, 8, 12, torch.float64)],
    "attention": [lambda d: attention_inputs(1, 2, 16, 16, torch.float32, d)],
    "rmsnorm_modulate": [lambda d: _rmsnorm(2, 3, 8, False)(torch.float32, d),
                         lambda d: _rmsnorm(2, 3, 8, False)(torch.float32, d)[:5] + (None,)],
    "gated_residual": [lambda d: _gated(2, 3, 8, True, False)(torch.float32, d)],
    "swiglu": [lambda d: (torch.randn(2, 3, 10, device=d),)],
    "patch_detailer": [lambda d: detailer_inputs(1, 16, 8, torch.float32, d)],
}


# inputs for the CUDA-graph capture of each op on a GPU: real sizes in bf16 (float32 weights where
# autocast gives them, the images as the model feeds them)
def _detailer_capture(device):
    return detailer_inputs(64, 16, 1152, torch.bfloat16, device)


CAPTURE = {
    "patchify": lambda d: (torch.randn(8, 3, 256, 256, device=d), 16, torch.bfloat16),
    "unpatchify": lambda d: (_randn(8, 256, 768, dtype=torch.bfloat16, device=d), 16, 256, 256, torch.float32),
    "attention": lambda d: attention_inputs(2, 4, 256, 72, torch.bfloat16, d, torch.float32),
    "rmsnorm_modulate": lambda d: (*rmsnorm_modulate_inputs(4, 256, 1152, torch.bfloat16, d, torch.float32), EPS,
                                   None),
    "gated_residual": lambda d: gated_residual_inputs(4, 256, 1152, torch.bfloat16, d),
    "swiglu": lambda d: (swiglu_input((4, 256, 2 * 1152), torch.bfloat16, d),),
    "patch_detailer": _detailer_capture,
}


# opcheck's inputs on a GPU: bf16 activations (what the Triton and CUDA kernels take there; they
# decline float32), float32 norm weights and RoPE tables as under autocast
OPCHECK_GPU = {
    "patchify": [lambda d: (_randn(2, 3, 8, 12, dtype=torch.bfloat16, device=d), 4, None),
                 lambda d: (torch.randn(2, 3, 8, 12, device=d), 4, torch.bfloat16)],
    "unpatchify": [lambda d: (_randn(2, 6, 3 * 16, dtype=torch.bfloat16, device=d), 4, 8, 12, None)],
    "attention": [lambda d: attention_inputs(2, 2, 64, 72, torch.bfloat16, d, torch.float32)],
    "rmsnorm_modulate": [lambda d: (*rmsnorm_modulate_inputs(2, 3, 8, torch.bfloat16, d, torch.float32), EPS,
                                    None)],
    "gated_residual": [lambda d: gated_residual_inputs(2, 3, 8, torch.bfloat16, d)],
    "swiglu": [lambda d: (_randn(2, 3, 10, dtype=torch.bfloat16, device=d),)],
    "patch_detailer": [lambda d: detailer_inputs(8, 16, 1152, torch.bfloat16, d)],
}


def sample(op, name):
    return next(s for s in SAMPLES[op] if s.name == name)


# ---------------------------------------------------------------- the comparison
def grads_of(spec, args):
    """Positions of the inputs the op is differentiated for."""
    names = list(inspect.signature(spec.signature).parameters)
    if spec.backward is not None:
        return [names.index(g) for g in spec.backward.grads]
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


def differentiable(spec):
    wanted = spec.backward.grad_outputs if spec.backward is not None and spec.backward.grad_outputs else spec.outputs
    return [i for i, o in enumerate(spec.outputs) if o in wanted]


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from v
        else:
            yield v


def leaves(args, wrt):
    def leaf(a, grad):
        if isinstance(a, (list, tuple)):
            return [leaf(t, grad) for t in a]
        if isinstance(a, torch.Tensor):
            return a.detach().clone().requires_grad_(grad)
        return a
    return [leaf(a, i in wrt) for i, a in enumerate(args)]


def outputs_and_grads(fn, spec, inputs, grad_outputs):
    """``fn``'s outputs on ``inputs`` (leaves, those differentiated requiring grad) and the
    gradients of the differentiable outputs w.r.t. the differentiated inputs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    targets = list(_flat(inputs[i] for i in grads_of(spec, inputs)))
    grads = torch.autograd.grad([outs[i] for i in differentiable(spec)], targets, grad_outputs)
    return [o.detach() for o in outs] + list(grads)


def _run(fn, spec, args, grad_outputs):
    """Outputs and the gradients of the differentiable ones w.r.t. the differentiated inputs."""
    return outputs_and_grads(fn, spec, leaves(args, grads_of(spec, args)), grad_outputs)


def _reference(op, spec, args, grad_outputs, high_precision):
    """The reference forward and autograd's gradients of it, on the inputs as they are or, given a
    ``high_precision`` dtype, cast to it (dtype arguments dropped: the result unrounded)."""
    def cast(a):
        if isinstance(a, (list, tuple)):
            return [cast(t) for t in a]
        if high_precision and isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.to(high_precision)
        if high_precision and isinstance(a, torch.dtype):
            return None
        return a
    forward = backends.backend_function(op, "reference")
    return _run(forward, spec, [cast(a) for a in args], [cast(g) for g in grad_outputs])


def _names(spec, args):
    params = list(inspect.signature(spec.signature).parameters)
    names = list(spec.outputs)
    for i in grads_of(spec, args):
        a = args[i]
        names += [f"grad {params[i]}[{k}]" for k in range(len(a))] if isinstance(a, list) else [f"grad {params[i]}"]
    return names


def grad_outputs_for(op, args):
    """Random gradients for custom op ``op``'s differentiable outputs on ``args``."""
    with torch.no_grad():
        outs = getattr(torch.ops.dip, op)(*args)
    return _grad_outputs(SPECS[op], outs if isinstance(outs, tuple) else (outs,))


def _grad_outputs(spec, outs_like):
    return [torch.randn(outs_like[i].shape, device=outs_like[i].device).to(outs_like[i].dtype)
            for i in differentiable(spec)]


def check_against_reference(op, backend_name, args, high_precision=torch.float64):
    """Run custom op ``op`` forward and backward (autograd) on ``args`` with every allocation
    poisoned, assert that it and its backward ran on ``backend_name``, and compare every output and
    gradient with the reference (see tests/test_backends.py); ``high_precision`` is the anchor's
    dtype (float32 stands in for float64 at real GPU sizes)."""
    spec, check = SPECS[op], CHECKS[op]
    with torch.no_grad():
        outs_like = backends.backend_function(op, "reference")(*args)
    grad_outputs = _grad_outputs(spec, outs_like if isinstance(outs_like, tuple) else (outs_like,))
    with poisoned_allocations(), ran_on(backend_name) as runs:
        got = _run(getattr(torch.ops.dip, op), spec, args, grad_outputs)
    assert len(runs) == 2, [c.op for c in runs]  # the op and its backward, both on this backend
    want = _reference(op, spec, args, grad_outputs, None)
    anchor = _reference(op, spec, args, grad_outputs, high_precision)
    dtype = next(_flat(a for a in args if isinstance(a, (torch.Tensor, list)))).dtype
    factor = check.half_factor if dtype in (torch.float16, torch.bfloat16) else 2.0
    error = error_measure(op, dtype)
    for label, g, lo, hi in zip(_names(spec, args), got, want, anchor):
        assert g.dtype == lo.dtype, f"{label}: dtype {g.dtype} != {lo.dtype}"
        if check.exact:
            assert torch.equal(g, lo), label
        else:
            assert_close_to_fp64(g, lo, hi, label, factor=factor, error=error)
