"""Triton patchify / unpatchify: (B, C, H, W) images <-> (B, N, C*P*P) tokens, the dtype cast fused
into the copy. Token features are ordered (channel, row, column) and tokens row-major over the patch
grid, exactly as dip_kernels.reference.patchify.

Both directions are one strided copy, so one kernel serves both: a program owns a tile of P whole
pixel rows (one patch row of one channel) by BLOCK_W pixel columns. On the image side every tile row
is a contiguous run of BLOCK_W pixels; on the token side every (row, patch) pair is a contiguous run
of P features. Arbitrary input strides are honoured (no .contiguous() copy); outputs are contiguous.
"""
import contextlib

import torch
import triton
import triton.language as tl

from . import capability, triton_interpreted
from .._alloc import output_buffer
from .launch import launch

# elements per program: enough bytes in flight per SM to saturate HBM, few enough registers per thread
_TILE_ELEMENTS = 4096


@triton.jit
def _patch_copy_kernel(
    img_ptr, tok_ptr,
    C, GH, GW, W, n_w_tiles,
    img_sb, img_sc, img_sh, img_sw,
    tok_sb, tok_sn, tok_sf,
    P: tl.constexpr, P_BLOCK: tl.constexpr, BLOCK_W: tl.constexpr, TO_TOKENS: tl.constexpr,
):
    # a flat grid: no 65535 limit on the batch*channel*grid-row count
    pid = tl.program_id(0)
    w_tile = pid % n_w_tiles
    rest = pid // n_w_tiles
    gy = rest % GH
    bc = rest // GH
    b = (bc // C).to(tl.int64)
    c = (bc % C).to(tl.int64)

    rows = tl.arange(0, P_BLOCK)  # pixel row inside the patch row
    cols = w_tile * BLOCK_W + tl.arange(0, BLOCK_W)  # pixel column in the image
    mask = (rows[:, None] < P) & (cols[None, :] < W)
    gx = cols // P
    col_in_patch = cols % P

    # per-program bases in int64 (large batches overflow int32); in-tile offsets stay int32
    img_base = b * img_sb + c * img_sc + (gy * P).to(tl.int64) * img_sh
    img_off = rows[:, None] * img_sh + cols[None, :] * img_sw
    tok_base = b * tok_sb + (gy * GW).to(tl.int64) * tok_sn + c * (P * P) * tok_sf
    tok_off = gx[None, :] * tok_sn + (rows[:, None] * P + col_in_patch[None, :]) * tok_sf

    if TO_TOKENS:
        v = tl.load(img_ptr + img_base + img_off, mask=mask)
        tl.store(tok_ptr + tok_base + tok_off, v.to(tok_ptr.dtype.element_ty), mask=mask)
    else:
        v = tl.load(tok_ptr + tok_base + tok_off, mask=mask)
        tl.store(img_ptr + img_base + img_off, v.to(img_ptr.dtype.element_ty), mask=mask)


def _device_guard(t):
    # triton launches on the current device; make it the tensor's one (no-op on CPU / interpreter)
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tiling(width, patch_size):
    """(P_BLOCK, BLOCK_W, tiles per image row) of the copy kernel for images ``width`` pixels wide."""
    p_block = triton.next_power_of_2(patch_size)
    block_w = max(16, min(triton.next_power_of_2(width), _TILE_ELEMENTS // p_block))
    return p_block, block_w, triton.cdiv(width, block_w)


def _launch(images, tokens, patch_size, to_tokens):
    b, c, h, w = images.shape
    if images.numel() == 0:
        return
    p = patch_size
    gh, gw = h // p, w // p
    p_block, block_w, n_w_tiles = tiling(w, p)
    grid = (b * c * gh * n_w_tiles,)
    extra = {} if triton_interpreted() else {"num_warps": 4}
    with _device_guard(images):
        launch(_patch_copy_kernel, grid, images, tokens, c, gh, gw, w, n_w_tiles,
               *images.stride(), *tokens.stride(),
               P=p, P_BLOCK=p_block, BLOCK_W=block_w, TO_TOKENS=to_tokens, **extra)


def patchify_forward(images, patch_size, out_dtype=None):
    b, c, h, w = images.shape
    n = (h // patch_size) * (w // patch_size)
    tokens = output_buffer((b, n, c * patch_size * patch_size), out_dtype or images.dtype, images.device)
    _launch(images, tokens, patch_size, True)
    return tokens


def unpatchify_forward(tokens, patch_size, height, width, out_dtype=None):
    b, _, cpp = tokens.shape
    c = cpp // (patch_size * patch_size)
    images = output_buffer((b, c, height, width), out_dtype or tokens.dtype, tokens.device)
    _launch(images, tokens, patch_size, False)
    return images


CAPABILITY = capability()  # every floating dtype, any shape
