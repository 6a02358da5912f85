"""Images (B,C,H,W) <-> patch tokens (B,N,C*P*P), each token ordered (channel, row, column) as
``F.unfold`` orders it and tokens in row-major order over the patch grid. The same memory viewed
as (B*N, C, P, P) is the Patch Detailer Head's layout, so no separate op is needed for it."""
import torch


def patchify(images, patch_size, out_dtype=None):
    b, c, h, w = images.shape
    p, gh, gw = patch_size, h // patch_size, w // patch_size
    out = images.new_empty((b, gh * gw, c * p * p), dtype=out_dtype or images.dtype)
    # one strided copy, cast included; never a view of the input
    out.view(b, gh, gw, c, p, p).copy_(images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5))
    return out


def unpatchify(tokens, patch_size, height, width, out_dtype=None):
    b, n, cpp = tokens.shape
    p, gh, gw = patch_size, height // patch_size, width // patch_size
    c = cpp // (p * p)
    out = tokens.new_empty((b, c, height, width), dtype=out_dtype or tokens.dtype)
    out.view(b, c, gh, p, gw, p).copy_(tokens.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5))
    return out


def patchify_forward(images, patch_size, out_dtype=None):
    return patchify(images, patch_size, out_dtype)


def unpatchify_forward(tokens, patch_size, height, width, out_dtype=None):
    return unpatchify(tokens, patch_size, height, width, out_dtype)
