"""patchify / unpatchify: the token ordering against F.unfold, round trips and the cast in the same
pass on every backend, op-layer checks (gradcheck, fake shapes), bad inputs, the Triton copy
kernel's tiling, and on a GPU real sizes.

The ops are pure copies (plus an optional cast), so kernel results must match the reference bit
for bit. Every backend against the reference over the catalogue (layouts, tails, multi-tile
widths), opcheck, torch.compile and CUDA-graph capture are tests/test_backends.py."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import dip_kernels
from dip_kernels.reference import patchify as ref
from dip_kernels.testing import assert_close_to_fp64, poisoned_allocations, ran_on

import conformance

BACKENDS = ["reference", "triton"]
SHAPES = conformance.PATCHIFY_SHAPES


def unfold_tokens(images, p):
    """Independent ground truth for the token layout: F.unfold orders each patch (c, row, col)
    and patches row-major over the grid."""
    return F.unfold(images.double(), kernel_size=p, stride=p).transpose(1, 2).to(images.dtype)


# ---------------------------------------------------------------- layout and round trip
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("b,c,h,w,p", SHAPES)
def test_patchify_matches_unfold(backend, name, b, c, h, w, p):
    backend(name, "patchify")
    images = torch.randn(b, c, h, w)
    tokens = dip_kernels.patchify(images, p)
    assert tokens.shape == (b, (h // p) * (w // p), c * p * p)
    assert torch.equal(tokens, unfold_tokens(images, p))
    # the same memory viewed (B*N, C, P, P) is the head's patch layout
    patches = tokens.view(-1, c, p, p)
    gw = w // p
    k = gw + gw - 1 if h // p > 1 else gw - 1  # batch 0, the last patch of grid row 1 (or 0)
    gy, gx = divmod(k, gw)
    assert torch.equal(patches[k], images[0, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("b,c,h,w,p", SHAPES)
def test_unpatchify_inverts_patchify(backend, name, b, c, h, w, p):
    backend(name, "patchify")
    images = torch.randn(b, c, h, w)
    assert torch.equal(dip_kernels.unpatchify(dip_kernels.patchify(images, p), p, h, w), images)
    tokens = torch.randn(b, (h // p) * (w // p), c * p * p)
    assert torch.equal(dip_kernels.patchify(dip_kernels.unpatchify(tokens, p, h, w), p), tokens)


@pytest.mark.parametrize("name", BACKENDS)
def test_cast_in_the_same_pass(backend, name):
    backend(name, "patchify")
    images = torch.randn(2, 3, 32, 16)
    tokens = dip_kernels.patchify(images, 16, torch.float16)
    assert tokens.dtype == torch.float16
    assert torch.equal(tokens, unfold_tokens(images, 16).half())
    back = dip_kernels.unpatchify(tokens, 16, 32, 16, torch.float32)
    assert back.dtype == torch.float32
    assert torch.equal(back, images.half().float())


# ---------------------------------------------------------------- op-layer checks
@pytest.mark.parametrize("name", BACKENDS)
def test_gradcheck(backend, name):
    # the copy is exact in float64 on the Triton path too, so both backends can be gradchecked
    # (fast mode for Triton: every interpreted launch costs tens of milliseconds)
    backend(name, "patchify")
    fast = name == "triton"
    images = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: dip_kernels.patchify(x, 2), (images,), fast_mode=fast)
    tokens = torch.randn(1, 6, 2 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dip_kernels.unpatchify(t, 2, 4, 6), (tokens,), fast_mode=fast)


def test_fake_shapes():
    with FakeTensorMode():
        images = torch.empty(2, 3, 64, 32)
        tokens = dip_kernels.patchify(images, 16, torch.bfloat16)
        assert tokens.shape == (2, 8, 768) and tokens.dtype == torch.bfloat16
        out = dip_kernels.unpatchify(tokens, 16, 64, 32, torch.float32)
        assert out.shape == (2, 3, 64, 32) and out.dtype == torch.float32


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("call,match", [
    (lambda: dip_kernels.patchify(torch.randn(3, 8, 8), 4), "images"),
    (lambda: dip_kernels.patchify(torch.randn(1, 3, 10, 8), 4), "images height and width"),
    (lambda: dip_kernels.patchify(torch.randn(1, 3, 8, 10), 4), "images height and width"),
    (lambda: dip_kernels.patchify(torch.randn(1, 3, 8, 8), 0), "patch_size"),
    (lambda: dip_kernels.patchify(torch.randint(0, 9, (1, 3, 8, 8)), 4), "images"),
    (lambda: dip_kernels.unpatchify(torch.randn(2, 48), 4, 8, 8), "tokens"),
    (lambda: dip_kernels.unpatchify(torch.randn(1, 3, 48), 4, 8, 8), "tokens must have 4 tokens"),
    (lambda: dip_kernels.unpatchify(torch.randn(1, 4, 50), 4, 8, 8), "tokens last dim"),
    (lambda: dip_kernels.unpatchify(torch.randn(1, 4, 48), 4, 8, 10), "height and width"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- the Triton copy kernel
def test_shapes_cover_the_multi_tile_path_and_its_tail():
    from dip_kernels.triton.patchify import tiling
    wide = [(w, tiling(w, p)) for _, _, _, w, p in SHAPES if tiling(w, p)[2] > 1]
    assert len(wide) >= 2 and all(w % block_w for w, (_, block_w, _) in wide)


@pytest.mark.parametrize("b,c,h,w,p", SHAPES[:2])
def test_triton_casting(backend, b, c, h, w, p):
    from dip_kernels.triton import patchify as tri
    images = conformance.image_layout(torch.randn(b, c, h, w), "channels_last")
    with poisoned_allocations():
        tokens = tri.patchify_forward(images, p, torch.float16)
        back = tri.unpatchify_forward(tokens, p, h, w, torch.float32)
    expected = ref.patchify(images, p, torch.float16)
    assert_close_to_fp64(tokens, expected, ref.patchify(images.double(), p), "tokens")
    assert torch.equal(tokens, expected)
    assert torch.equal(back, ref.unpatchify(expected, p, h, w, torch.float32))


# ---------------------------------------------------------------- GPU: real sizes, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("p", [16, 32])
def test_gpu_real_size_bf16(backend, p):
    backend("triton", "patchify")
    images = torch.randn(64, 3, 256, 256, device="cuda")
    with poisoned_allocations(), ran_on("triton"):
        tokens = dip_kernels.patchify(images.bfloat16(), p)
        cast_tokens = dip_kernels.patchify(images, p, torch.bfloat16)
        back = dip_kernels.unpatchify(tokens, p, 256, 256, torch.float32)
    expected = ref.patchify(images, p).bfloat16()  # float32 reference, then the one rounding
    assert torch.equal(tokens, expected)
    assert torch.equal(cast_tokens, expected)
    assert torch.equal(back, images.bfloat16().float())
    channels_last = images.bfloat16().contiguous(memory_format=torch.channels_last)
    assert torch.equal(dip_kernels.patchify(channels_last, p), expected)
