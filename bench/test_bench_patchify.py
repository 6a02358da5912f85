"""patchify / unpatchify (torch.ops.dip.patchify, .unpatchify) with the dtypes the model uses:
patchify of the float32 input image, unpatchify of the bf16 detailer output back to a float32 image
(autocast). Pure data movement: GB/s is the measure. Forward only (each op's backward is the other)."""
import pytest
import torch

import dip_kernels
from dip_kernels.reference import patchify as ref

from bench import cases, providers, timing

PATCH = 16
if cases.ON_GPU:
    SIZES = {"b32-256": (32, 256), "b64-256": (64, 256), "b8-512": (8, 512)}
    # slow: the extra shapes that bench/gpu_check.sh leaves to --full / --suite patchify
    PATCHIFY_CASES = [("fwd", "f32", label, label != "b32-256") for label in SIZES]
    UNPATCHIFY_CASES = [("fwd", "bf16tof32", label, label != "b32-256") for label in SIZES]
else:
    SIZES = {"b2-32": (2, 32)}
    PATCHIFY_CASES = [("fwd", "f32", "b2-32")]
    UNPATCHIFY_CASES = [("fwd", "f32", "b2-32")]


def _dtypes(label):
    return {"f32": (torch.float32, torch.float32), "bf16tof32": (torch.bfloat16, torch.float32)}[label]


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(PATCHIFY_CASES, providers.OP_PROVIDERS))
def test_patchify(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("patchify", provider, device)
    b, size = SIZES[case]
    in_dtype, out_dtype = _dtypes(dtype)
    fn, backend = providers.op_implementation(provider, "patchify", ref.patchify, dip_kernels.patchify)
    out_arg = None if out_dtype == in_dtype else out_dtype

    def make_inputs():
        return (cases.randn((b, 3, size, size), in_dtype, device),)

    call = cases.no_grad_fn(lambda images: fn(images, PATCH, out_arg))
    n = (size // PATCH) ** 2
    info = cases.info("patchify", "patchify", mode, dtype, case, provider,
                      shape={"images": (b, 3, size, size), "tokens": (b, n, 3 * PATCH * PATCH)}, flops=None,
                      bytes_moved=cases.tensor_bytes(((b, 3, size, size), in_dtype), ((b, n, 3 * PATCH * PATCH), out_dtype)))
    with backend:
        timing.run(benchmark, call, make_inputs, info=info, device=device)


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(UNPATCHIFY_CASES, providers.OP_PROVIDERS))
def test_unpatchify(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("patchify", provider, device)
    b, size = SIZES[case]
    in_dtype, out_dtype = _dtypes(dtype)
    fn, backend = providers.op_implementation(provider, "patchify", ref.unpatchify, dip_kernels.unpatchify)
    out_arg = None if out_dtype == in_dtype else out_dtype
    n = (size // PATCH) ** 2

    def make_inputs():
        return (cases.randn((b, n, 3 * PATCH * PATCH), in_dtype, device),)

    call = cases.no_grad_fn(lambda tokens: fn(tokens, PATCH, size, size, out_arg))
    info = cases.info("patchify", "unpatchify", mode, dtype, case, provider,
                      shape={"tokens": (b, n, 3 * PATCH * PATCH), "images": (b, 3, size, size)}, flops=None,
                      bytes_moved=cases.tensor_bytes(((b, n, 3 * PATCH * PATCH), in_dtype), ((b, 3, size, size), out_dtype)))
    with backend:
        timing.run(benchmark, call, make_inputs, info=info, device=device)
