"""DiP: a DiT backbone on pixel patches plus a per-patch Patch Detailer Head (arXiv 2511.18822).

The whole model in one file, in plain PyTorch plus the ``dip_kernels`` ops. Conventions:

* x (B, 3, H, W) in [-1, 1], H and W divisible by the patch size P (non-square is fine);
* t (B,) in [0, 1], t = 1 the clean image;
* y (B,) class ids, ``num_classes`` is the null class for classifier-free guidance;
* ``model(x, t, y)`` returns a tensor of x's shape and dtype.

Mixed precision: under ``torch.autocast`` the residual stream stays in x's dtype (float32) while the
Linear layers run in the autocast dtype; the small (B, D) modulation tensors are cast to the stream's
dtype because the fused ops ask for that, and the normalised block inputs are written straight in
the autocast dtype so the following Linear needs no extra cast.

Weights trained with the official code load with ``load_official_state_dict``.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import dip_kernels

HEADS = ("patch_detailer", "mlp", "coord_mlp", "attention", "none")
# the paper's head ablation (arXiv 2511.18822, Table 2: FID-50K on ImageNet 256 at 160 epochs), in its
# order: what it calls each head, and that head's FID
HEAD_ABLATION = {"none": ("DiT-only", 5.28), "mlp": ("+ standard MLP", 6.92), "coord_mlp": ("+ coordinate MLP", 2.20),
                 "attention": ("+ intra-patch attention", 2.98),
                 "patch_detailer": ("+ conv U-Net (Patch Detailer Head)", 2.16)}
HEAD_ALIASES = {"unet": "patch_detailer"}  # the Patch Detailer Head's earlier name, still accepted
NORM_EPS = 1e-6
TIME_FREQ_CHANNELS = 256
TIME_MAX_PERIOD = 10.0  # t lives in [0, 1], so the frequencies span 1 .. 1/10 (official code)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------- embedders
def timestep_frequencies(t: torch.Tensor, channels: int = TIME_FREQ_CHANNELS,
                         max_period: float = TIME_MAX_PERIOD) -> torch.Tensor:
    """cat[cos(t f), sin(t f)] with f_i = max_period^(-i/half), i < half; float32 (float64 for float64 t)."""
    half = channels // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_channels: int = TIME_FREQ_CHANNELS):
        super().__init__()
        self.frequency_channels = frequency_channels
        self.mlp = nn.Sequential(
            nn.Linear(frequency_channels, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t):
        # under autocast the Linear casts for itself; otherwise match the weights (e.g. float64)
        freqs = timestep_frequencies(t, self.frequency_channels).to(self.mlp[0].weight.dtype)
        return self.mlp(freqs)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight; in the blocks its weight feeds the fused ops directly."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


# ----------------------------------------------------------------------------- transformer block
class Attention(nn.Module):
    """qkv Linear -> per-head qk-RMSNorm + 2D RoPE + SDPA (one fused op) -> output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={num_heads}")
        head_dim = dim // num_heads
        if head_dim % 4:
            raise ValueError(f"head_dim = hidden_size/num_heads must be divisible by 4 for 2D RoPE, got {head_dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope_cos, rope_sin):
        out = dip_kernels.attention(self.qkv(x), self.q_norm.weight, self.k_norm.weight, rope_cos, rope_sin,
                                    self.num_heads, self.q_norm.eps)
        return self.proj(out)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), with w1 and w3 fused into one Linear ``w13`` (rows [w1; w3])."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.w2(dip_kernels.swiglu(self.w13(x)))


class DiPBlock(nn.Module):
    """adaLN-modulated pre-RMSNorm transformer block with gated residuals (no adaLN-zero init)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        # the official sizing: 2/3 of the plain MLP width, so SwiGLU's three matrices cost about two
        self.mlp = SwiGLU(hidden_size, int(2 * int(hidden_size * mlp_ratio) / 3))
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, x, c, rope_cos, rope_sin):
        # the fused ops want shift/scale/gate in the residual stream's dtype (float32 under autocast)
        mod = self.adaLN_modulation(c).to(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.contiguous() for m in mod.chunk(6, -1))
        out_dtype = dip_kernels.ops.autocast_dtype(x.device)
        h = dip_kernels.rmsnorm_modulate(x, self.norm1.weight, shift_msa, scale_msa, self.norm1.eps, out_dtype)
        x = dip_kernels.gated_residual(x, gate_msa, self.attn(h, rope_cos, rope_sin))
        h = dip_kernels.rmsnorm_modulate(x, self.norm2.weight, shift_mlp, scale_mlp, self.norm2.eps, out_dtype)
        return dip_kernels.gated_residual(x, gate_mlp, self.mlp(h))


# ----------------------------------------------------------------------------- heads
# Every head maps (patches (B, N, C*P*P) of the noisy input, s (B, N, D) the global token of each
# patch, h (B, N, D) the last block's output, c (B, D) the condition) to (B, N, C*P*P).

class PatchDetailerHead(nn.Module):
    """The paper's head: a small conv U-Net run on every patch, the global token at its bottleneck."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3):
        super().__init__()
        if patch_size not in (16, 32) or in_channels != 3:
            raise ValueError(f"the Patch Detailer Head needs patch_size in (16, 32) and in_channels=3, "
                             f"got patch_size={patch_size}, in_channels={in_channels}")
        self.patch_size = patch_size
        e1, e2, e3, e4 = 64, 128, 256, 512
        self.enc1 = nn.Conv2d(in_channels, e1, 3, padding=1)
        self.enc2 = nn.Conv2d(e1, e2, 3, padding=1)
        self.enc3 = nn.Conv2d(e2, e3, 3, padding=1)
        self.enc4 = nn.Conv2d(e3, e4, 3, padding=1)
        self.bottleneck = nn.Conv2d(e4 + hidden_size, e4, 1)
        self.up4 = nn.ConvTranspose2d(e4, e4, 2, stride=2)
        self.dec4 = nn.Conv2d(e4 + e4, 256, 3, padding=1)
        self.up3 = nn.ConvTranspose2d(256, 256, 2, stride=2)
        self.dec3 = nn.Conv2d(256 + e3, 128, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(128, 128, 2, stride=2)
        self.dec2 = nn.Conv2d(128 + e2, 64, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(64, 64, 2, stride=2)
        self.dec1 = nn.Conv2d(64 + e1, 64, 3, padding=1)
        self.out = nn.Conv2d(64, in_channels, 1)
        self._weight_names = [tuple(name.split(".")) for name in dip_kernels.DETAILER_WEIGHT_NAMES]

    def weights(self) -> List[torch.Tensor]:
        """The 28 tensors in dip_kernels.DETAILER_WEIGHT_NAMES order."""
        return [getattr(getattr(self, module), param) for module, param in self._weight_names]

    def forward(self, patches, s, h, c):
        b, n, cpp = patches.shape
        p = self.patch_size
        out = dip_kernels.patch_detailer(patches.reshape(b * n, cpp // (p * p), p, p),
                                         s.reshape(b * n, s.shape[-1]), self.weights())
        return out.reshape(b, n, cpp)


class PatchMLPHead(nn.Module):
    """Ablation: one MLP per patch on concat(flattened noisy patch, global token)."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3):
        super().__init__()
        patch_dim = in_channels * patch_size * patch_size
        self.fc1 = nn.Linear(patch_dim + hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, patch_dim)

    def forward(self, patches, s, h, c):
        return self.fc2(F.silu(self.fc1(torch.cat([patches, s.to(patches.dtype)], dim=-1))))


class CoordMLPHead(nn.Module):
    """Ablation: a per-pixel MLP on Fourier features of the pixel's (row, col) in its patch and its
    noisy value, its hidden layer modulated by the patch's global token."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, width: int = 64,
                 num_freqs: int = 8):
        super().__init__()
        self.patch_size, self.in_channels, self.num_freqs = patch_size, in_channels, num_freqs
        self.in_proj = nn.Linear(4 * num_freqs + in_channels, width)
        self.cond = nn.Linear(hidden_size, 2 * width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, in_channels)

    def coord_features(self, device, dtype):
        """(P*P, 4*num_freqs): sin/cos of 2^k pi u for u the pixel centre's row and column in [0, 1]."""
        p = self.patch_size
        u = (torch.arange(p, device=device, dtype=torch.float32) + 0.5) / p
        rows, cols = torch.meshgrid(u, u, indexing="ij")
        freqs = math.pi * 2.0 ** torch.arange(self.num_freqs, device=device, dtype=torch.float32)
        args = torch.stack([rows.reshape(-1), cols.reshape(-1)], -1)[..., None] * freqs  # (PP, 2, F)
        return torch.cat([args.sin(), args.cos()], -1).reshape(p * p, 4 * self.num_freqs).to(dtype)

    def forward(self, patches, s, h, c):
        b, n, cpp = patches.shape
        pp = self.patch_size * self.patch_size
        pixels = patches.reshape(b, n, self.in_channels, pp).transpose(-1, -2)  # (B, N, PP, C)
        coords = self.coord_features(patches.device, patches.dtype).expand(b, n, pp, -1)
        scale, shift = self.cond(s).unsqueeze(2).chunk(2, dim=-1)
        z = F.silu(modulate(self.in_proj(torch.cat([coords, pixels], -1)), shift, scale))
        out = self.out(F.silu(self.fc(z)))  # (B, N, PP, C)
        return out.transpose(-1, -2).reshape(b, n, cpp)


class _PixelBlock(nn.Module):
    """Pre-LN transformer layer over the pixels of a patch, adaLN-modulated by the global token."""

    def __init__(self, width: int, num_heads: int, cond_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.adaLN_modulation = nn.Linear(cond_size, 6 * width)

    def forward(self, x, s):
        m, length, width = x.shape
        mod = self.adaLN_modulation(s).unsqueeze(1).to(x.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = qkv.reshape(m, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(m, length, width)
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class IntraPatchAttentionHead(nn.Module):
    """Ablation: the P*P pixels of each patch as tokens of a small transformer conditioned on s."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, width: int = 64,
                 num_heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.in_proj = nn.Linear(in_channels, width)
        self.pos_embed = nn.Parameter(torch.randn(patch_size * patch_size, width) * 0.02)
        self.blocks = nn.ModuleList([_PixelBlock(width, num_heads, hidden_size) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * width)
        self.out = nn.Linear(width, in_channels)

    def forward(self, patches, s, h, c):
        b, n, cpp = patches.shape
        pp = self.patch_size * self.patch_size
        pixels = patches.reshape(b * n, self.in_channels, pp).transpose(1, 2)  # (M, PP, C)
        s = s.reshape(b * n, s.shape[-1])
        z = (self.in_proj(pixels) + self.pos_embed).to(patches.dtype)
        for block in self.blocks:
            z = block(z, s)
        shift, scale = self.adaLN_modulation(s).unsqueeze(1).chunk(2, dim=-1)
        out = self.out(modulate(self.norm(z), shift, scale))  # (M, PP, C)
        return out.transpose(1, 2).reshape(b, n, cpp)


class DiTFinalLayer(nn.Module):
    """Ablation "none" (DiT only): adaLN-modulated LayerNorm of the last block's output, then Linear."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, in_channels * patch_size * patch_size)

    def forward(self, patches, s, h, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


_HEAD_CLASSES = {
    "patch_detailer": PatchDetailerHead,
    "mlp": PatchMLPHead,
    "coord_mlp": CoordMLPHead,
    "attention": IntraPatchAttentionHead,
    "none": DiTFinalLayer,
}


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class DiPConfig:
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 16
    num_classes: int = 1000
    in_channels: int = 3
    head: str = "patch_detailer"
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "head", HEAD_ALIASES.get(self.head, self.head))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        for name in ("hidden_size", "depth", "num_heads", "patch_size", "num_classes", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")


def canonical_model_config(fields):
    """A saved DiPConfig dict (or None) with its head under its current name."""
    if not fields or "head" not in fields:
        return fields
    return {**fields, "head": HEAD_ALIASES.get(fields["head"], fields["head"])}


class DiP(nn.Module):
    """DiP: patch embedding -> ``depth`` DiT blocks (2D RoPE, no absolute positions) -> global token
    s = silu(t_emb + h) per patch -> head (by default the Patch Detailer Head) -> image."""

    def __init__(self, config: DiPConfig, **overrides):
        super().__init__()
        unknown = set(overrides) - {f.name for f in fields(DiPConfig)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; "
                             f"DiPConfig has {[f.name for f in fields(DiPConfig)]}")
        config = replace(config, **overrides) if overrides else config
        self.config = config
        d, p, ch = config.hidden_size, config.patch_size, config.in_channels
        self.patch_size, self.in_channels, self.num_classes = p, ch, config.num_classes
        self.hidden_size, self.num_heads = d, config.num_heads
        self.x_embedder = nn.Linear(ch * p * p, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(config.num_classes + 1, d)  # last row: the null class
        self.blocks = nn.ModuleList([DiPBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.head = _HEAD_CLASSES[config.head](p, d, ch)
        self.grad_checkpointing = False
        # RoPE tables per (grid_h, grid_w, device); plain attribute, so never in the state dict
        self._rope_cache: Dict[Tuple[int, int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation; every other layer keeps PyTorch's default."""
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def set_grad_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enabled
        return self

    def rope(self, grid_h: int, grid_w: int, device: torch.device):
        """(cos, sin) RoPE tables for a grid_h x grid_w patch grid, cached per grid and device."""
        key = (grid_h, grid_w, device)
        table = self._rope_cache.get(key)
        if table is None:
            head_dim = self.hidden_size // self.num_heads
            if torch.compiler.is_compiling():
                # built inside the graph instead: a Python-side cache write would be a side effect
                # for the compiler to replay
                return dip_kernels.rope_table(grid_h, grid_w, head_dim, device)
            # a table made under inference_mode could not be saved for a later training backward
            with torch.inference_mode(False):
                table = dip_kernels.rope_table(grid_h, grid_w, head_dim, device)
            self._rope_cache[key] = table
        return table

    def _check_inputs(self, x, t, y, return_hidden_at):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor (B, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        b, ch, hgt, wid = x.shape
        if ch != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got shape {tuple(x.shape)}")
        if hgt % self.patch_size or wid % self.patch_size:
            raise ValueError(f"x height and width must be divisible by patch_size={self.patch_size}, "
                             f"got shape {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,) or not t.is_floating_point():
            raise ValueError(f"t must be a floating tensor of shape ({b},), got "
                             f"{(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (b,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an int64 tensor of shape ({b},) of class ids, got "
                             f"{(tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if return_hidden_at is not None and (not isinstance(return_hidden_at, int)
                                             or not 1 <= return_hidden_at <= len(self.blocks)):
            raise ValueError(f"return_hidden_at must be a block number in 1..{len(self.blocks)}, "
                             f"got {return_hidden_at!r}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                return_hidden_at: Optional[int] = None):
        """Returns the output image (x's shape and dtype); with ``return_hidden_at=k`` also the
        (B, N, D) tokens after block k (1-based), for REPA alignment."""
        self._check_inputs(x, t, y, return_hidden_at)
        b, _, height, width = x.shape
        p = self.patch_size
        cos, sin = self.rope(height // p, width // p, x.device)

        patches = dip_kernels.patchify(x, p)  # (B, N, C*P*P), (c, row, col) order
        h = self.x_embedder(patches).to(x.dtype)  # the residual stream stays in x's dtype
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y))

        hidden = None
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, cos, sin, use_reentrant=False)
            else:
                h = block(h, c, cos, sin)
            if return_hidden_at == i + 1:
                hidden = h

        s = F.silu(t_emb.unsqueeze(1) + h).to(h.dtype)  # the global token of each patch
        out = self.head(patches, s, h, c)
        out = dip_kernels.unpatchify(out, p, height, width, x.dtype)
        return out if return_hidden_at is None else (out, hidden)


# ----------------------------------------------------------------------------- configs
def DiPXL16(**overrides) -> DiP:
    return DiP(DiPConfig(hidden_size=1152, depth=26, num_heads=16, patch_size=16), **overrides)


def DiPL16(**overrides) -> DiP:
    return DiP(DiPConfig(hidden_size=1024, depth=22, num_heads=16, patch_size=16), **overrides)


def DiPB16(**overrides) -> DiP:
    return DiP(DiPConfig(hidden_size=768, depth=12, num_heads=12, patch_size=16), **overrides)


def DiPS16(**overrides) -> DiP:
    return DiP(DiPConfig(hidden_size=384, depth=12, num_heads=6, patch_size=16), **overrides)


def DiPXL32(**overrides) -> DiP:
    """XL with 32x32 patches, for 512x512 images."""
    return DiP(DiPConfig(hidden_size=1152, depth=26, num_heads=16, patch_size=32), **overrides)


def DiT1B16(**overrides) -> DiP:
    """The paper's scaled-DiT baseline (Table 2, DiT scaled to 1.1B): no detail head (head "none"),
    the DiP-XL/16 backbone widened from hidden 1152 to 1536 (16 heads of 96, depth 26)."""
    return DiP(DiPConfig(hidden_size=1536, depth=26, num_heads=16, patch_size=16, head="none"), **overrides)


def DiPTiny(**overrides) -> DiP:
    """For tests and smoke runs: head_dim 16."""
    return DiP(DiPConfig(hidden_size=64, depth=2, num_heads=4, patch_size=16, num_classes=10), **overrides)


CONFIGS = {
    "DiP-XL/16": DiPXL16,
    "DiP-L/16": DiPL16,
    "DiP-B/16": DiPB16,
    "DiP-S/16": DiPS16,
    "DiP-XL/32": DiPXL32,
    "DiT-1.1B/16": DiT1B16,
    "DiP-Tiny": DiPTiny,
}


def build_model(name_or_config: Union[str, DiPConfig], **overrides) -> DiP:
    """A DiP from a CONFIGS name (e.g. "DiP-XL/16") or a DiPConfig, with field overrides."""
    if isinstance(name_or_config, DiPConfig):
        return DiP(name_or_config, **overrides)
    if name_or_config not in CONFIGS:
        raise ValueError(f"unknown model {name_or_config!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name_or_config](**overrides)


# ----------------------------------------------------------------------------- official weights
_OFFICIAL_HEAD = {  # official LocalDecoder module -> ours (the official convs sit at index 0 of a Sequential)
    **{f"{n}.0": n for n in ("enc1", "enc2", "enc3", "enc4", "bottleneck", "dec4", "dec3", "dec2", "dec1")},
    **{n: n for n in ("up4", "up3", "up2", "up1")},
    "out_conv": "out",
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap_checkpoint(sd):
    """The flat name -> tensor dict inside a checkpoint: unwraps {"ema"|"model"|"state_dict": ...},
    prefers the official trainer's EMA weights ("ema_denoiser.") over "denoiser.", strips
    DDP/compile prefixes."""
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("ema", "model", "state_dict"):
            if key in sd:
                sd = sd[key]
                break
        else:
            break
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict must be a dict of tensors, got {type(sd).__name__}")
    for prefix in ("ema_denoiser.", "denoiser."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out = {}
    for k, v in sd.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        out[k] = v
    return out


def convert_official_state_dict(sd) -> Dict[str, torch.Tensor]:
    """Official DiP parameter names -> ours. Keys it does not recognise pass through unchanged, so
    the strict load reports them."""
    sd = _unwrap_checkpoint(sd)
    out, w1s, w3s = {}, {}, {}
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("s_embedder.proj."):
            out["x_embedder." + parts[-1]] = v
        elif k == "y_embedder.embedding_table.weight":
            out["y_embedder.weight"] = v
        elif parts[0] == "blocks" and parts[2:4] == ["adaLN_modulation", "0"]:
            out[".".join(parts[:2] + ["adaLN_modulation"] + parts[4:])] = v
        elif parts[0] == "blocks" and parts[2] == "mlp" and parts[3] in ("w1", "w3") and parts[4:] == ["weight"]:
            (w1s if parts[3] == "w1" else w3s)[".".join(parts[:3])] = v
        elif parts[0] == "local_decoder":
            rest = ".".join(parts[1:-1])
            out[f"head.{_OFFICIAL_HEAD.get(rest, rest)}.{parts[-1]}"] = v
        else:  # t_embedder.mlp.{0,2}.*, blocks.i.{norm1,norm2,attn.*,mlp.w2}.* keep their names
            out[k] = v
    for prefix in sorted(set(w1s) | set(w3s)):
        if prefix not in w1s or prefix not in w3s:
            missing = "w1" if prefix not in w1s else "w3"
            raise ValueError(f"state_dict has {prefix}.{'w3' if missing == 'w1' else 'w1'}.weight but not "
                             f"{prefix}.{missing}.weight; both halves of the SwiGLU input projection are needed")
        out[f"{prefix}.w13.weight"] = torch.cat([w1s[prefix], w3s[prefix]], dim=0)
    return out


def _short(names, limit=20):
    return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


def state_dict_mismatches(own: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor]
                          ) -> Tuple[List[str], List[str], List[str]]:
    """How ``given`` fails to fit a model whose state dict is ``own``: (missing keys, unexpected keys,
    "name: given shape vs model shape" for every shape mismatch), each sorted; all empty when it fits."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [f"{k}: {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(given)) if tuple(given[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def load_official_state_dict(model: DiP, state_dict, strict: bool = True):
    """Load weights saved by the official DiP code into ``model``. With ``strict`` any missing or
    unexpected key raises a ValueError listing them; returns torch's (missing, unexpected) result."""
    converted = convert_official_state_dict(state_dict)
    if strict:
        missing, unexpected, mismatched = state_dict_mismatches(model.state_dict(), converted)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"official state_dict does not match the model (config {model.config}):\n"
                f"  missing keys ({len(missing)}): {_short(missing)}\n"
                f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}\n"
                f"  shape mismatches ({len(mismatched)}): {_short(mismatched)}")
    return model.load_state_dict(converted, strict=strict)
