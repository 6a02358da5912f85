"""The attention op (qk-RMSNorm + 2D RoPE + non-causal attention): the reference against an
independent naive implementation (forward, and its written-out backward), the custom-op layer
(gradcheck, fake shapes, input checks), what is particular to the Triton kernels (strided qkv read
in place, a deterministic backward, the dtypes they decline and where those go), and on a GPU bf16
at real sizes.

Every backend against the reference over the op's sample catalogue, opcheck, torch.compile and
CUDA-graph capture are tests/test_backends.py."""
import math

import pytest
import torch

import dip_kernels
from dip_kernels.reference import attention as ref
from dip_kernels import backends
from dip_kernels.testing import ran_on

import conformance

EPS = 1e-6


def make_inputs(b, h, n, d, dtype=torch.float32, weight_dtype=None, device="cpu", requires_grad=False):
    qkv, qw, kw, cos, sin, _, _ = conformance.attention_inputs(b, h, n, d, dtype, device, weight_dtype)
    for t in (qkv, qw, kw) if requires_grad else ():
        t.requires_grad_(True)
    return qkv, qw, kw, cos, sin


# ---------------------------------------------------------------- reference sanity
def naive_attention(qkv, qw, kw, cos, sin, num_heads, eps):
    """float64, loops over batch and head, RoPE as a complex multiply, softmax written out;
    differentiable, so autograd through it checks the reference's backward too."""
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    rot = torch.complex(cos.double(), sin.double())  # (N, d/2)
    outs, lses = [], []
    for bi in range(b):
        head_outs, head_lses = [], []
        for hi in range(num_heads):
            def head(slot, w):
                x = qkv[bi, :, (slot * num_heads + hi) * d:(slot * num_heads + hi + 1) * d].double()
                if w is None:
                    return x
                x = x / torch.sqrt((x * x).sum(-1, keepdim=True) / d + eps) * w.double()
                z = torch.complex(x[:, 0::2], x[:, 1::2]) * rot
                return torch.stack([z.real, z.imag], dim=-1).reshape(n, d)
            q, k, v = head(0, qw), head(1, kw), head(2, None)
            scores = q @ k.T / math.sqrt(d)
            row_max = scores.max(-1, keepdim=True).values.detach()
            e = torch.exp(scores - row_max)
            total = e.sum(-1, keepdim=True)
            head_outs.append((e / total) @ v)
            head_lses.append((row_max + torch.log(total)).squeeze(-1))
        outs.append(torch.cat(head_outs, dim=-1))
        lses.append(torch.stack(head_lses))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("b,h,n,d", [(2, 2, 12, 8), (1, 3, 20, 16)])
def test_reference_matches_naive_fp64(b, h, n, d):
    qkv, qw, kw, cos, sin = make_inputs(b, h, n, d, torch.float64, requires_grad=True)
    want_out, want_lse = naive_attention(qkv, qw, kw, cos, sin, h, EPS)
    out, lse = ref.attention_forward(qkv, qw, kw, cos, sin, h, EPS)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)  # lse is stored as float32
    go = torch.randn_like(want_out)
    want_grads = torch.autograd.grad(want_out, (qkv, qw, kw), go)
    grads = ref.attention_backward(go, qkv, qw, kw, cos, sin, out, lse, h, EPS)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- op layer (reference backend on CPU)
def _op_args(b=1, h=2, n=8, d=8, dtype=torch.float32, requires_grad=True):
    qkv, qw, kw, cos, sin = make_inputs(b, h, n, d, dtype, requires_grad=requires_grad)
    return (qkv, qw, kw, cos, sin, h, EPS)


def test_gradcheck_fp64():
    qkv, qw, kw, cos, sin, h, eps = _op_args(b=1, h=2, n=6, d=8, dtype=torch.float64)
    fn = lambda x, a, c: dip_kernels.attention(x, a, c, cos, sin, h, eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv, qw, kw), fast_mode=True)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        qkv = torch.empty(3, 24, 3 * 4 * 72, dtype=torch.bfloat16)
        qw, kw = torch.empty(72), torch.empty(72)
        cos, sin = torch.empty(24, 36), torch.empty(24, 36)
        out, lse = torch.ops.dip.attention(qkv, qw, kw, cos, sin, 4, EPS)
        g_qkv, g_qw, g_kw = torch.ops.dip.attention_backward(out, qkv, qw, kw, cos, sin, out, lse, 4, EPS)
    assert out.shape == (3, 24, 4 * 72) and out.dtype == torch.bfloat16
    assert lse.shape == (3, 4, 24) and lse.dtype == torch.float32
    assert g_qkv.shape == qkv.shape and g_qkv.dtype == qkv.dtype
    assert g_qw.shape == (72,) and g_qw.dtype == torch.float32 and g_kw.shape == (72,)


def test_bad_input_names_argument():
    qkv, qw, kw, cos, sin, h, eps = _op_args(requires_grad=False)
    with pytest.raises(ValueError, match="rope_cos"):
        dip_kernels.attention(qkv, qw, kw, cos[:-1], sin, h, eps)
    with pytest.raises(ValueError, match="k_norm_weight"):
        dip_kernels.attention(qkv, qw, kw[:-1], cos, sin, h, eps)


# ---------------------------------------------------------------- the Triton kernels
@pytest.mark.parametrize("layout", ["row_padded", "channel_strided"])
def test_triton_non_contiguous_qkv(backend, layout):
    """A strided view of qkv runs without a copy and gives exactly the contiguous result."""
    backend("triton", "attention")
    b, h, n, d = 1, 2, 20, 72
    qkv, qw, kw, cos, sin, _, _ = conformance.attention_inputs(b, h, n, d, torch.float32, layout=layout)
    assert not qkv.is_contiguous()
    go = torch.randn(b, n, h * d)
    out, lse = torch.ops.dip.attention(qkv, qw, kw, cos, sin, h, EPS)
    grads = torch.ops.dip.attention_backward(go, qkv, qw, kw, cos, sin, out, lse, h, EPS)
    dense = qkv.contiguous()
    out_c, lse_c = torch.ops.dip.attention(dense, qw, kw, cos, sin, h, EPS)
    grads_c = torch.ops.dip.attention_backward(go, dense, qw, kw, cos, sin, out_c, lse_c, h, EPS)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for g, gc in zip(grads, grads_c):
        assert torch.equal(g, gc)


def test_triton_autograd_through_public_function(backend):
    """dip_kernels.attention (what the model calls) runs the Triton op and its backward."""
    backend("triton", "attention")
    qkv, qw, kw, cos, sin = make_inputs(1, 2, 20, 72, requires_grad=True)
    with ran_on("triton") as runs:
        out = dip_kernels.attention(qkv, qw, kw, cos, sin, 2)
        go = torch.randn_like(out)
        grads = torch.autograd.grad(out, (qkv, qw, kw), go)
    assert [c.op for c in runs] == ["attention", "attention_backward"]
    want = ref.attention(qkv, qw, kw, cos, sin, 2)
    want_grads = torch.autograd.grad(want, (qkv, qw, kw), go)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_triton_backward_deterministic(backend):
    backend("triton", "attention")
    qkv, qw, kw, cos, sin = make_inputs(2, 2, 36, 64, torch.float16)
    go = torch.randn(2, 36, 2 * 64).half()
    out, lse = torch.ops.dip.attention(qkv, qw, kw, cos, sin, 2, EPS)
    first = torch.ops.dip.attention_backward(go, qkv, qw, kw, cos, sin, out, lse, 2, EPS)
    second = torch.ops.dip.attention_backward(go, qkv, qw, kw, cos, sin, out, lse, 2, EPS)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_float64_on_triton_runs_the_reference_visibly(backend):
    """float64 is declined by the Triton kernels: the reference runs it, with a warning and the
    choice recorded, never silently."""
    backend("triton", "attention")
    qkv, qw, kw, cos, sin, h, eps = _op_args(dtype=torch.float64, requires_grad=False)
    explained = dip_kernels.explain("attention", qkv, qw, kw)
    assert explained.startswith("dip.attention: reference") and "float64" in explained
    warning = "triton selected, but it cannot run these inputs: float64"
    with pytest.warns(RuntimeWarning, match=warning), backends.recorded_runs() as runs:
        out = dip_kernels.attention(qkv, qw, kw, cos, sin, h, eps)
    assert [(c.op, c.backend) for c in runs] == [("attention", "reference")] and "float64" in runs[0].reason
    torch.testing.assert_close(out, ref.attention(qkv, qw, kw, cos, sin, h, eps), rtol=0, atol=0)


def test_float32_goes_to_sdpa_on_a_gpu_with_the_reason(gpu_machine):
    """On a GPU (not the interpreter) the Triton kernels decline float32 (they spill at head dim
    72 and the backward does not fit an A100): auto on CUDA passes to the reference (SDPA) and says why."""
    from dip_kernels.triton import attention as tri
    qkv = torch.randn(1, 16, 3 * 2 * 72)
    assert tri.attention_capability(True).declines("cpu", (qkv,)) is None  # the interpreter runs float32
    assert "float32" in tri.CAPABILITY.declines("cuda", (qkv,)) and tri.CAPABILITY.declines("cuda", (qkv.bfloat16(),)) is None
    choice = backends._select("attention", torch.device("cuda"), (qkv,))
    assert choice.backend == "reference" and "not triton: float32" in choice.reason
    assert backends._select("attention", torch.device("cuda"), (qkv.bfloat16(),)).backend != "reference"


# ---------------------------------------------------------------- GPU: real sizes, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("b,h,n,d", [(2, 16, 256, 72), (32, 16, 256, 72), (2, 16, 1024, 72)])
def test_triton_bf16_real_sizes_gpu(backend, b, h, n, d):
    backend("triton", "attention")
    # the anchor is float32 at these sizes (float64 would be slow)
    conformance.check_against_reference("attention", "triton", conformance.attention_inputs(
        b, h, n, d, torch.bfloat16, "cuda", torch.float32), high_precision=torch.float32)


@pytest.mark.gpu
def test_float32_runs_the_reference_on_a_gpu(backend):
    backend("auto", "attention")
    fp32 = make_inputs(2, 2, 64, 72, torch.float32, device="cuda")
    assert dip_kernels.explain("attention", *fp32).startswith("dip.attention: reference")
