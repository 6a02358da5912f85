"""patchify / unpatchify: images (B, C, H, W) <-> patch tokens (B, N, C*P*P), with the dtype cast in
the same pass. Each is the other's derivative, so neither has a backward op of its own."""
from typing import Optional

import torch
from torch import Tensor

from .. import opspec
from ..opspec import OpSpec, define
from ..reference import patchify as _ref
from . import checks

BACKENDS = {"triton": "dip_kernels.triton.patchify", "reference": "dip_kernels.reference.patchify"}


def check_patchify(images, patch_size, out_dtype=None):
    checks.tensor("images", images, rank=4)
    checks.positive_int("patch_size", patch_size)
    _, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images height and width must be divisible by patch_size={patch_size}, got (H, W)=({h}, {w})")


def check_unpatchify(tokens, patch_size, height, width, out_dtype=None):
    checks.tensor("tokens", tokens, rank=3)
    checks.positive_int("patch_size", patch_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"height and width must be divisible by patch_size={patch_size}, got ({height}, {width})")
    n_expected = (height // patch_size) * (width // patch_size)
    if tokens.shape[1] != n_expected:
        raise ValueError(f"tokens must have {n_expected} tokens for a {height}x{width} image with patch_size="
                         f"{patch_size}, got shape {tuple(tokens.shape)}")
    if tokens.shape[2] % (patch_size * patch_size):
        raise ValueError(f"tokens last dim must be channels*{patch_size}*{patch_size}, got {tokens.shape[2]}")


def patchify_signature(images: Tensor, patch_size: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    ...


def unpatchify_signature(tokens: Tensor, patch_size: int, height: int, width: int,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    ...


def _patchify_fake(images, patch_size, out_dtype=None):
    b, c, h, w = images.shape
    n = (h // patch_size) * (w // patch_size)
    return images.new_empty((b, n, c * patch_size * patch_size), dtype=out_dtype or images.dtype)


def _unpatchify_fake(tokens, patch_size, height, width, out_dtype=None):
    c = tokens.shape[2] // (patch_size * patch_size)
    return tokens.new_empty((tokens.shape[0], c, height, width), dtype=out_dtype or tokens.dtype)


def _patchify_setup(ctx, inputs, output):
    images, patch_size, _ = inputs
    ctx.patch_size, ctx.hw, ctx.dtype = patch_size, images.shape[2:], images.dtype


def _patchify_backward(ctx, grad):
    return torch.ops.dip.unpatchify(grad, ctx.patch_size, ctx.hw[0], ctx.hw[1], ctx.dtype), None, None


def _unpatchify_setup(ctx, inputs, output):
    tokens, patch_size, _, _, _ = inputs
    ctx.patch_size, ctx.dtype = patch_size, tokens.dtype


def _unpatchify_backward(ctx, grad):
    return torch.ops.dip.patchify(grad, ctx.patch_size, ctx.dtype), None, None, None, None


define(OpSpec("patchify", patchify_signature, outputs=("tokens",), check=check_patchify, fake=_patchify_fake,
              backends=BACKENDS, autograd=(_patchify_setup, _patchify_backward)))
define(OpSpec("unpatchify", unpatchify_signature, outputs=("images",), check=check_unpatchify, fake=_unpatchify_fake,
              backends=BACKENDS, family="patchify", autograd=(_unpatchify_setup, _unpatchify_backward)))


def patchify(images: Tensor, patch_size: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """(B, C, H, W) -> (B, N, C*P*P) tokens; ``.view(B*N, C, P, P)`` gives the detailer's patch layout."""
    if opspec.plain():
        return _ref.patchify(images, patch_size, out_dtype)
    return torch.ops.dip.patchify(images, patch_size, out_dtype)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """(B, N, C*P*P) tokens -> (B, C, H, W) images."""
    if opspec.plain():
        return _ref.unpatchify(tokens, patch_size, height, width, out_dtype)
    return torch.ops.dip.unpatchify(tokens, patch_size, height, width, out_dtype)
