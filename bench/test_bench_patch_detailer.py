"""The Patch Detailer Head (torch.ops.dip.patch_detailer) on DiPXL16's shapes: 512 patches (one
256x256 image with guidance), 8192 (training batch 32) and 16384 (sampling batch 64), token dim
1152, 16x16 patches, bf16. fwdbwd differentiates w.r.t. the tokens and the 28 weights (the patches
are pixels: no gradient), FLOPs counted as 3x the forward's."""
import math

import pytest
import torch

import dip_kernels
from dip_kernels.reference import patch_detailer as ref

from bench import cases, providers, timing

PATCH = 16
if cases.ON_GPU:
    DTYPE, TOKEN_DIM = torch.bfloat16, 1152
    # slow: the extra shape that bench/gpu_check.sh leaves to --full / --suite patch_detailer
    CASES = [("fwd", "bf16", "512"), ("fwd", "bf16", "8192"), ("fwd", "bf16", "16384", True),
             ("fwdbwd", "bf16", "8192")]
else:
    DTYPE, TOKEN_DIM = torch.float32, 64
    # the Triton head under the CPU interpreter takes seconds per call: fwd only unless -m slow
    CASES = [("fwd", "f32", "2"), ("fwdbwd", "f32", "2", ("triton",))]


def head_weights(token_dim, dtype, device, requires_grad):
    ws = []
    for shape in ref.head_weight_shapes(token_dim):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) > 1 else 0.02
        ws.append(cases.randn(shape, dtype, device, scale, requires_grad))
    return ws


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(CASES, providers.OP_PROVIDERS))
def test_patch_detailer(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("patch_detailer", provider, device)
    m = int(case)
    train = mode == "fwdbwd"
    fn, backend = providers.op_implementation(provider, "patch_detailer", ref.patch_detailer,
                                              dip_kernels.patch_detailer)

    def make_inputs():
        patches = cases.randn((m, 3, PATCH, PATCH), DTYPE, device)
        tokens = cases.randn((m, TOKEN_DIM), DTYPE, device, requires_grad=train)
        weights = head_weights(TOKEN_DIM, DTYPE, device, train)
        if not train:
            return patches, tokens, weights
        return patches, tokens, weights, cases.randn((m, 3, PATCH, PATCH), DTYPE, device)

    call = cases.grad_fn(fn, 3, wrt=(1, 2)) if train else cases.no_grad_fn(fn)
    weight_bytes = cases.tensor_bytes(*[(s, DTYPE) for s in ref.head_weight_shapes(TOKEN_DIM)])
    io = cases.tensor_bytes(((m, 3, PATCH, PATCH), DTYPE), ((m, TOKEN_DIM), DTYPE), ((m, 3, PATCH, PATCH), DTYPE))
    fwd_flops = m * ref.flops_per_patch(PATCH, TOKEN_DIM)
    if train:  # + grad_out read, g_tokens and g_weights written
        bytes_moved = io + weight_bytes + cases.tensor_bytes(((m, 3, PATCH, PATCH), DTYPE), ((m, TOKEN_DIM), DTYPE)) \
            + weight_bytes
    else:
        bytes_moved = io + weight_bytes
    info = cases.info("patch_detailer", "patch_detailer", mode, dtype, case, provider,
                      shape={"patches": (m, 3, PATCH, PATCH), "tokens": (m, TOKEN_DIM)},
                      flops=3 * fwd_flops if train else fwd_flops, bytes_moved=bytes_moved,
                      flops_note="3x forward" if train else "forward convolutions")
    with backend:
        timing.run(benchmark, call, make_inputs, info=info, device=device)
