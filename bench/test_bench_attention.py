"""Attention with per-head qk-RMSNorm and 2D RoPE (torch.ops.dip.attention) on DiPXL16's shapes:
qkv (B, N, 3*16*72) bf16 from the qkv Linear, norm weights float32 (the model's parameters), RoPE
tables float32. 256 tokens (256x256 images) at B = 2 (one image with guidance), 32 (training), 64
(sampling); 1024 tokens (512x512) at B = 2 and 8.

FLOPs are the two attention matmuls, 4*B*N^2*H*d forward; fwdbwd counts 3.5x that (the usual
flash-attention convention: backward = 2.5x forward). The op_reference provider is the dip op on
its reference backend, which also computes the lse with an explicit float32 QK^T: compare it with reference
(the plain reference function) to see that overhead."""
import pytest
import torch

import dip_kernels
from dip_kernels.reference import attention as ref

from bench import cases, providers, timing

EPS = 1e-6
if cases.ON_GPU:
    DTYPE, HEADS, HEAD_DIM = torch.bfloat16, 16, 72
    SIZES = {"b2-n256": (2, 16), "b32-n256": (32, 16), "b64-n256": (64, 16), "b2-n1024": (2, 32),
             "b8-n1024": (8, 32)}
    # slow: the extra shapes that bench/gpu_check.sh leaves to --full / --suite attention
    CASES = [("fwd", "bf16", "b2-n256"), ("fwd", "bf16", "b32-n256", True), ("fwd", "bf16", "b64-n256"),
             ("fwd", "bf16", "b2-n1024", True), ("fwd", "bf16", "b8-n1024", True),
             ("fwdbwd", "bf16", "b32-n256"), ("fwdbwd", "bf16", "b8-n1024", True)]
else:
    DTYPE, HEADS, HEAD_DIM = torch.float32, 4, 16
    SIZES = {"b2-n16": (2, 4)}
    CASES = [("fwd", "f32", "b2-n16"), ("fwdbwd", "f32", "b2-n16")]

PROVIDERS = ("reference", "compile", "op_reference", "triton", "cuda")


def _reference(qkv, qw, kw, cos, sin):
    return ref.attention(qkv, qw, kw, cos, sin, HEADS, EPS)


def _dip(qkv, qw, kw, cos, sin):
    return dip_kernels.attention(qkv, qw, kw, cos, sin, HEADS, EPS)


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(CASES, PROVIDERS))
def test_attention(benchmark, device, mode, dtype, case, provider):
    cases.skip_if_unavailable("attention", provider, device)
    b, grid = SIZES[case]
    n, hd = grid * grid, HEADS * HEAD_DIM
    train = mode == "fwdbwd"
    fn, backend = providers.op_implementation(provider, "attention", _reference, _dip)
    cos, sin = dip_kernels.rope_table(grid, grid, HEAD_DIM, device)

    def make_inputs():
        qkv = cases.randn((b, n, 3 * hd), DTYPE, device, requires_grad=train)
        qw = (1 + 0.1 * torch.randn(HEAD_DIM, device=device)).requires_grad_(train)
        kw = (1 + 0.1 * torch.randn(HEAD_DIM, device=device)).requires_grad_(train)
        args = (qkv, qw, kw, cos, sin)
        return args + (cases.randn((b, n, hd), DTYPE, device),) if train else args

    call = cases.grad_fn(fn, 5, wrt=(0, 1, 2)) if train else cases.no_grad_fn(fn)
    fwd_flops = 4 * b * n * n * hd
    small = cases.tensor_bytes(((HEAD_DIM,), torch.float32), ((HEAD_DIM,), torch.float32),
                               ((n, HEAD_DIM // 2), torch.float32), ((n, HEAD_DIM // 2), torch.float32))
    qkv_bytes = cases.tensor_bytes(((b, n, 3 * hd), DTYPE))
    out_bytes = cases.tensor_bytes(((b, n, hd), DTYPE))
    # fwd: qkv read, out written; fwdbwd: + grad_out read, g_qkv written
    bytes_moved = qkv_bytes + out_bytes + small + ((out_bytes + qkv_bytes) if train else 0)
    info = cases.info("attention", "attention", mode, dtype, case, provider,
                      shape={"qkv": (b, n, 3 * hd), "heads": HEADS, "head_dim": HEAD_DIM},
                      flops=3.5 * fwd_flops if train else fwd_flops, bytes_moved=bytes_moved,
                      flops_note="QK^T and PV; backward 2.5x forward" if train else "QK^T and PV")
    if provider == "op_reference":
        info["note"] = "reference backend also computes lse via an explicit fp32 QK^T; backward recomputes"
    with backend:
        timing.run(benchmark, call, make_inputs, info=info, device=device)
