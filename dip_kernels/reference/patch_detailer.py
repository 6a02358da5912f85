"""The Patch Detailer Head: a per-patch convolutional U-Net (arXiv 2511.18822), applied to all
B*N patches as one batch.

patches (M, 3, P, P), P in {16, 32}; tokens (M, D), the global token of each patch;
weights: the 28 tensors named by DETAILER_WEIGHT_NAMES, in that order (nn.Conv2d / nn.ConvTranspose2d
layouts). Encoder: conv3x3+SiLU then 2x2 max-pool at 4 levels (3->64->128->256->512). Bottleneck:
conv1x1 over concat(pooled, token) + SiLU (the token repeated over a 2x2 bottleneck when P=32).
Decoder: ConvTranspose2d(2, stride 2), concat(upsampled, skip), conv3x3+SiLU at each level.
Output: conv1x1 64->3.
"""
import torch
import torch.nn.functional as F

ENCODER_CHANNELS = (64, 128, 256, 512)
DECODER_CHANNELS = (256, 128, 64, 64)  # dec4, dec3, dec2, dec1 outputs
DETAILER_WEIGHT_NAMES = (
    "enc1.weight", "enc1.bias", "enc2.weight", "enc2.bias",
    "enc3.weight", "enc3.bias", "enc4.weight", "enc4.bias",
    "bottleneck.weight", "bottleneck.bias",
    "up4.weight", "up4.bias", "dec4.weight", "dec4.bias",
    "up3.weight", "up3.bias", "dec3.weight", "dec3.bias",
    "up2.weight", "up2.bias", "dec2.weight", "dec2.bias",
    "up1.weight", "up1.bias", "dec1.weight", "dec1.bias",
    "out.weight", "out.bias",
)


def detailer_weight_shapes(token_dim, in_channels=3):
    """Expected shape of each detailer weight, in DETAILER_WEIGHT_NAMES order."""
    e1, e2, e3, e4 = ENCODER_CHANNELS
    d4, d3, d2, d1 = DECODER_CHANNELS
    conv = lambda co, ci, k: [(co, ci, k, k), (co,)]  # noqa: E731
    up = lambda c: [(c, c, 2, 2), (c,)]  # noqa: E731
    shapes = conv(e1, in_channels, 3) + conv(e2, e1, 3) + conv(e3, e2, 3) + conv(e4, e3, 3)
    shapes += conv(e4, e4 + token_dim, 1)
    shapes += up(e4) + conv(d4, e4 + e4, 3)
    shapes += up(d4) + conv(d3, d4 + e3, 3)
    shapes += up(d3) + conv(d2, d3 + e2, 3)
    shapes += up(d2) + conv(d1, d2 + e1, 3)
    shapes += conv(in_channels, d1, 1)
    return [tuple(s) for s in shapes]


def patch_detailer(patches, tokens, weights):
    return _forward(patches, tokens, weights)[0]


def _forward(patches, tokens, weights, saved=None):
    """The detailer's output; with ``saved`` (a dict), also what the backward needs."""
    w = dict(zip(DETAILER_WEIGHT_NAMES, weights))
    keep = saved is not None
    h = patches
    skips = []
    for level in range(1, 5):
        z = F.conv2d(h, w[f"enc{level}.weight"], w[f"enc{level}.bias"], padding=1)
        if keep:
            saved[f"enc{level}"] = h, z
        h = F.silu(z)
        skips.append(h)
        if keep:
            h, saved[f"pool{level}"] = F.max_pool2d(h, 2, return_indices=True)
        else:
            h = F.max_pool2d(h, 2)
    tok = tokens[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
    cat = torch.cat([h, tok], dim=1)
    z = F.conv2d(cat, w["bottleneck.weight"], w["bottleneck.bias"])
    if keep:
        saved["bottleneck"] = cat, z
    h = F.silu(z)
    for level in range(4, 0, -1):
        up = F.conv_transpose2d(h, w[f"up{level}.weight"], w[f"up{level}.bias"], stride=2)
        if keep:
            saved[f"up{level}"] = h
        cat = torch.cat([up, skips[level - 1]], dim=1)
        z = F.conv2d(cat, w[f"dec{level}.weight"], w[f"dec{level}.bias"], padding=1)
        if keep:
            saved[f"dec{level}"] = cat, z
        h = F.silu(z)
    if keep:
        saved["out"] = h
    return F.conv2d(h, w["out.weight"], w["out.bias"]), skips


def patch_detailer_forward(patches, tokens, weights):
    return patch_detailer(patches, tokens, weights)


def _conv_backward(grad, x, weight, padding=0, stride=1, transposed=False):
    """(input, weight, bias) gradients of a convolution, by aten's own backward (as autograd runs it)."""
    n = weight.shape[1] if transposed else weight.shape[0]
    return torch.ops.aten.convolution_backward(grad, x, weight, [n], [stride] * 2, [padding] * 2, [1, 1], transposed,
                                               [0, 0], 1, [True, True, True])


def patch_detailer_backward(grad_out, patches, tokens, weights):
    """The forward's derivative, layer by layer with the backward ops autograd itself would run
    (aten.convolution_backward, silu_backward, max_pool2d_with_indices_backward): the same numbers
    as autograd of the forward, without re-entering autograd."""
    w = dict(zip(DETAILER_WEIGHT_NAMES, weights))
    saved = {}
    _, skips = _forward(patches, tokens, weights, saved)
    grads = {}
    g, grads["out.weight"], grads["out.bias"] = _conv_backward(grad_out, saved["out"], w["out.weight"])
    g_skips = {}
    for level in range(1, 5):
        cat, z = saved[f"dec{level}"]
        g_cat, grads[f"dec{level}.weight"], grads[f"dec{level}.bias"] = _conv_backward(
            torch.ops.aten.silu_backward(g, z), cat, w[f"dec{level}.weight"], padding=1)
        c_up = w[f"up{level}.weight"].shape[1]
        g_skips[level] = g_cat[:, c_up:]
        g, grads[f"up{level}.weight"], grads[f"up{level}.bias"] = _conv_backward(
            g_cat[:, :c_up], saved[f"up{level}"], w[f"up{level}.weight"], stride=2, transposed=True)
    cat, z = saved["bottleneck"]
    g_cat, grads["bottleneck.weight"], grads["bottleneck.bias"] = _conv_backward(
        torch.ops.aten.silu_backward(g, z), cat, w["bottleneck.weight"])
    c4 = ENCODER_CHANNELS[-1]
    g, g_tokens = g_cat[:, :c4], g_cat[:, c4:].sum((2, 3))
    for level in range(4, 0, -1):
        x, z = saved[f"enc{level}"]
        g = torch.ops.aten.max_pool2d_with_indices_backward(g, skips[level - 1], [2, 2], [2, 2], [0, 0], [1, 1],
                                                            False, saved[f"pool{level}"])
        g, grads[f"enc{level}.weight"], grads[f"enc{level}.bias"] = _conv_backward(
            torch.ops.aten.silu_backward(g_skips[level] + g, z), x, w[f"enc{level}.weight"], padding=1)
    return g.contiguous(), g_tokens.contiguous(), [grads[name].contiguous() for name in DETAILER_WEIGHT_NAMES]


def flops_per_patch(patch_size, token_dim):
    """Forward FLOPs (2 x multiply-accumulates) of one patch through the detailer."""
    macs = 0
    s = patch_size
    shapes = detailer_weight_shapes(token_dim)
    sizes = [s, s // 2, s // 4, s // 8]
    for i in range(4):  # encoder
        co, ci, k, _ = shapes[2 * i]
        macs += co * ci * k * k * sizes[i] ** 2
    bs = s // 16
    co, ci, _, _ = shapes[8]
    macs += co * ci * bs * bs
    for j, level in enumerate(range(4, 0, -1)):
        up_w = shapes[10 + 4 * j]
        dec_w = shapes[12 + 4 * j]
        out_size = sizes[level - 1]
        macs += up_w[0] * up_w[1] * 4 * (out_size // 2) ** 2
        macs += dec_w[0] * dec_w[1] * 9 * out_size ** 2
    macs += 3 * 64 * s * s
    return 2 * macs
