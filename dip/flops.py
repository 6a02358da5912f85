"""FLOPs of one image's forward pass, counted by torch's FlopCounterMode on a meta-device copy of the
model, with the dip custom ops' FLOPs added analytically (attention: its two matmuls; the Patch
Detailer Head: its convolutions). Used by the benchmarks' achieved-TFLOP/s columns and the
ablation recipes' GPU-hour estimates."""
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from dip_kernels.reference.patch_detailer import flops_per_patch


def _attention_flops(qkv, qw, kw, cos, sin, num_heads, eps, out_shape=None):
    b, n, three_hd = qkv
    return 4 * b * n * n * (three_hd // 3)


def _detailer_flops(patches, tokens, weights, out_shape=None):
    return patches[0] * flops_per_patch(patches[2], tokens[1])


def forward_flops_per_image(build: Callable[[], torch.nn.Module], resolution: int) -> Optional[int]:
    """FLOPs of one image's forward (matmuls, convolutions, attention) of the model ``build()`` makes,
    or None if counting fails (a model change the meta device cannot follow)."""
    try:
        with torch.device("meta"):
            model = build()
        x = torch.randn(1, 3, resolution, resolution, device="meta")
        t = torch.rand(1, device="meta")
        y = torch.zeros(1, dtype=torch.long, device="meta")
        mapping = {torch.ops.dip.attention: _attention_flops, torch.ops.dip.patch_detailer: _detailer_flops}
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x, t, y)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - callers report times without FLOPs rather than fail
        return None
