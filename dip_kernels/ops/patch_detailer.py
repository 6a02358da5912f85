"""patch_detailer: the whole Patch Detailer Head (the paper's per-patch conv U-Net) in one op.

patches (M, 3, P, P), P in {16, 32}; tokens (M, D), each patch's global token; weights: the 28
tensors named by DETAILER_WEIGHT_NAMES, in that order, all of the patches' dtype -> out (M, 3, P, P).
The backward op receives the op's inputs only (the backends recompute what they need)."""
from typing import List

import torch
from torch import Tensor

from .. import opspec
from ..opspec import Backward, OpSpec, define
from ..reference import patch_detailer as _ref
from ..reference.patch_detailer import DETAILER_WEIGHT_NAMES, detailer_weight_shapes
from . import checks


def check_patch_detailer(patches, tokens, weights):
    checks.tensor("patches", patches, rank=4)
    m, c, p, p2 = patches.shape
    if c != 3:
        raise ValueError(f"patches must have 3 channels, shape (M, 3, P, P), got {tuple(patches.shape)}")
    if p != p2 or p not in (16, 32):
        raise ValueError(f"patches must be (M, 3, P, P) with P in (16, 32), got {tuple(patches.shape)}")
    checks.tensor("tokens", tokens, rank=2)
    checks.same("tokens", tokens, "patches", patches)
    if tokens.shape[0] != m:
        raise ValueError(f"tokens must have one row per patch, shape ({m}, D), got {tuple(tokens.shape)}")
    if len(weights) != len(DETAILER_WEIGHT_NAMES):
        raise ValueError(f"weights must hold the {len(DETAILER_WEIGHT_NAMES)} detailer tensors "
                         f"{DETAILER_WEIGHT_NAMES}, got {len(weights)}")
    for name, w, shape in zip(DETAILER_WEIGHT_NAMES, weights, detailer_weight_shapes(tokens.shape[1])):
        checks.tensor(f"weights[{name}]", w)
        checks.same(f"weights[{name}]", w, "patches", patches)
        checks.shape(f"weights[{name}]", w, shape)
        if not w.is_contiguous():
            raise ValueError(f"weights[{name}] must be contiguous")


def patch_detailer_signature(patches: Tensor, tokens: Tensor, weights: List[Tensor]) -> Tensor:
    ...


def _fake(patches, tokens, weights):
    return torch.empty_like(patches, memory_format=torch.contiguous_format)


define(OpSpec(
    "patch_detailer", patch_detailer_signature, outputs=("out",), check=check_patch_detailer, fake=_fake, dispatch=3,
    backends={"cuda": "dip_kernels.cuda.patch_detailer", "triton": "dip_kernels.triton.patch_detailer",
              "onednn": "dip_kernels.onednn.patch_detailer", "reference": "dip_kernels.reference.patch_detailer"},
    backward=Backward(saves=("patches", "tokens", "weights"), grads=("patches", "tokens", "weights"))))


def autocast_dtype(device: torch.device):
    """The autocast dtype for ``device`` when autocast is on there, else None."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def patch_detailer(patches: Tensor, tokens: Tensor, weights: List[Tensor]) -> Tensor:
    """The whole Patch Detailer Head on (M, 3, P, P) patches and (M, D) tokens. Under autocast every
    input is cast to the autocast dtype (the detailer is all convolutions)."""
    if opspec.plain():
        return _ref.patch_detailer(patches, tokens, list(weights))
    dtype = autocast_dtype(patches.device)
    if dtype is not None:
        patches, tokens = patches.to(dtype), tokens.to(dtype)
        weights = [w.to(dtype) for w in weights]
    elif tokens.dtype != patches.dtype:
        raise ValueError(f"tokens has dtype {tokens.dtype} but patches has {patches.dtype}; they must match")
    return torch.ops.dip.patch_detailer(patches, tokens, list(weights))

