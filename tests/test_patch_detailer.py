"""The Patch Detailer Head op: the reference against an nn.Module built from torch's own layers
(forward, and its written-out backward against autograd), the custom-op layer (gradcheck, fake
shapes, input checks), the detailer's plan (dip_kernels/plan/patch_detailer.py: derived from the
weight names, run by the torch executor dip_kernels/plan/patch_detailer_torch.py against the
reference), the one weight cache (versioned and unversioned in-place updates, CUDA-graph capture),
and on a GPU the Triton detailer at real sizes and a short training run.

Every backend against the reference over the detailer's sample catalogue, opcheck, torch.compile
and CUDA-graph capture are tests/test_backends.py; the CUDA executor's lowering is
tests/test_patch_detailer_cuda.py, the onednn backend's own paths tests/test_patch_detailer_onednn.py."""
import pytest
import torch
from torch import nn

import dip_kernels
from dip_kernels import DETAILER_WEIGHT_NAMES
from dip_kernels.plan import patch_detailer as plan
from dip_kernels.plan import patch_detailer_torch as torch_head
from dip_kernels.reference import patch_detailer as ref
from dip_kernels.reference.patch_detailer import detailer_weight_shapes
from dip_kernels.testing import assert_close_to_fp64, poisoned_allocations

import conformance
from conformance import detailer_inputs as make_inputs


class Head(nn.Module):
    """The detailer written with torch's layers, independently of the reference's functional form."""

    def __init__(self, token_dim):
        super().__init__()
        conv3 = lambda ci, co: nn.Conv2d(ci, co, 3, padding=1)  # noqa: E731
        up = lambda c: nn.ConvTranspose2d(c, c, 2, stride=2)  # noqa: E731
        self.enc1, self.enc2, self.enc3, self.enc4 = conv3(3, 64), conv3(64, 128), conv3(128, 256), conv3(256, 512)
        self.bottleneck = nn.Conv2d(512 + token_dim, 512, 1)
        self.up4, self.dec4 = up(512), conv3(1024, 256)
        self.up3, self.dec3 = up(256), conv3(512, 128)
        self.up2, self.dec2 = up(128), conv3(256, 64)
        self.up1, self.dec1 = up(64), conv3(128, 64)
        self.out = nn.Conv2d(64, 3, 1)
        self.pool, self.act = nn.MaxPool2d(2), nn.SiLU()

    def forward(self, x, tokens):
        skips = []
        for enc in (self.enc1, self.enc2, self.enc3, self.enc4):
            x = self.act(enc(x))
            skips.append(x)
            x = self.pool(x)
        tok = tokens[:, :, None, None].repeat(1, 1, x.shape[2], x.shape[3])
        x = self.act(self.bottleneck(torch.cat([x, tok], 1)))
        for up, dec, skip in zip((self.up4, self.up3, self.up2, self.up1),
                                 (self.dec4, self.dec3, self.dec2, self.dec1), reversed(skips)):
            x = self.act(dec(torch.cat([up(x), skip], 1)))
        return self.out(x)


@pytest.mark.parametrize("p", [16, 32])
def test_reference_matches_torch_layers_fp64(p):
    """Forward against the nn.Module, and the reference's written-out backward against autograd of
    that module, in float64."""
    d = 8
    head = Head(d).double()
    patches = torch.randn(2, 3, p, p, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(2, d, dtype=torch.float64, requires_grad=True)
    weights = [head.state_dict()[n] for n in DETAILER_WEIGHT_NAMES]
    assert [tuple(w.shape) for w in weights] == detailer_weight_shapes(d)
    want = head(patches, tokens)
    torch.testing.assert_close(ref.patch_detailer(patches, tokens, weights), want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(want)
    params = dict(head.named_parameters())
    autograd = torch.autograd.grad(want, [patches, tokens] + [params[n] for n in DETAILER_WEIGHT_NAMES], grad_out)
    g_p, g_t, g_w = ref.patch_detailer_backward(grad_out, patches.detach(), tokens.detach(), weights)
    for name, got, expected in zip(["patches", "tokens", *DETAILER_WEIGHT_NAMES], [g_p, g_t, *g_w], autograd):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


def test_flops_per_patch_matches_the_anchor_arithmetic():
    # docs / ANCHORS.md: 133.8 MFLOP per 16x16 patch with the XL token dim 1152
    assert abs(ref.flops_per_patch(16, 1152) / 1e6 - 133.8) < 0.1


# ---------------------------------------------------------------- the op on the reference backend
def test_gradcheck_fp64():
    patches, tokens, weights = make_inputs(1, 16, 4, torch.float64)
    parts = [patches, tokens, *weights]
    shapes = [t.shape for t in parts]
    # every input packed into one vector: fast-mode gradcheck then checks a random projection of
    # all gradients at once with two forward evaluations, instead of two per input tensor
    flat = torch.cat([t.reshape(-1) for t in parts]).requires_grad_(True)

    def fn(x):
        p, t, *ws = [c.view(s) for c, s in zip(x.split([s.numel() for s in shapes]), shapes)]
        return dip_kernels.patch_detailer(p, t, ws)
    assert torch.autograd.gradcheck(fn, (flat,), fast_mode=True, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        patches = torch.empty(5, 3, 32, 32, dtype=torch.bfloat16)
        tokens = torch.empty(5, 24, dtype=torch.bfloat16)
        weights = [torch.empty(s, dtype=torch.bfloat16) for s in detailer_weight_shapes(24)]
        out = torch.ops.dip.patch_detailer(patches, tokens, weights)
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.bfloat16
        g_p, g_t, g_w = torch.ops.dip.patch_detailer_backward(out, patches, tokens, weights)
        assert g_p.shape == patches.shape and g_t.shape == tokens.shape
        assert [g.shape for g in g_w] == [w.shape for w in weights]
        with pytest.raises(ValueError, match="patches"):
            torch.ops.dip.patch_detailer(patches[:, :2], tokens, weights)


def _bad(what):
    patches, tokens, weights = make_inputs(1, 16, 8)
    if what == "channels":
        patches = torch.randn(1, 4, 16, 16)
    elif what == "patch_size":
        patches = torch.randn(1, 3, 8, 8)
    elif what == "non_square":
        patches = torch.randn(1, 3, 16, 32)
    elif what == "token_count":
        tokens = torch.randn(2, 8)
    elif what == "weight_dtype":
        weights[4] = weights[4].double()
    elif what == "weight_shape":
        weights[12] = torch.randn(256, 1000, 3, 3)
    elif what == "weight_non_contiguous":
        weights[2] = weights[2].transpose(2, 3).contiguous().transpose(2, 3)
    elif what == "weight_count":
        weights = weights[:-1]
    return patches, tokens, weights


@pytest.mark.parametrize("what,names", [
    ("channels", "patches"), ("patch_size", "patches"), ("non_square", "patches"), ("token_count", "tokens"),
    ("weight_dtype", r"weights\[enc3.weight\]"), ("weight_shape", r"weights\[dec4.weight\]"),
    ("weight_non_contiguous", r"weights\[enc2.weight\]"), ("weight_count", "weights"),
])
def test_bad_inputs_name_the_argument(what, names):
    patches, tokens, weights = _bad(what)
    with pytest.raises(ValueError, match=names):
        dip_kernels.patch_detailer(patches, tokens, weights)
    with pytest.raises(ValueError, match=names):
        torch.ops.dip.patch_detailer(patches, tokens, weights)


def test_tokens_dtype_mismatch_names_tokens():
    patches, tokens, weights = make_inputs(1, 16, 8)
    with pytest.raises(ValueError, match="tokens"):
        dip_kernels.patch_detailer(patches, tokens.double(), weights)


# ---------------------------------------------------------------- the plan
def test_plan_is_derived_from_the_weight_names():
    """Every detailer weight is read by one forward GEMM and gets one WeightGrad; every activation a
    step reads was written by an earlier step (or is an op input); the output conv is the last
    forward step and the backward ends with the patches' gradient."""
    for p in (16, 32):
        fwd, bwd = plan.forward_plan(p), plan.backward_plan(p)
        weights = [s.weight.weight for s in fwd] + [s.bias.weight for s in fwd]
        assert sorted(weights) == sorted(DETAILER_WEIGHT_NAMES)
        grads = [s.weight for s in bwd if isinstance(s, plan.WeightGrad)]
        grads += [s.bias for s in bwd if isinstance(s, plan.WeightGrad)]
        assert sorted(grads) == sorted(DETAILER_WEIGHT_NAMES)
        written = {"x", "tokens", "g_out"}
        for step in fwd + bwd:
            assert set(plan._reads(step)) <= written, (step.name, set(plan._reads(step)) - written)
            written |= set(plan._writes(step))
        assert fwd[-1].out == ("out",) and bwd[-1].out == ("g_x",)


@pytest.mark.parametrize("m,p,d,dtype", [(2, 16, 16, torch.float32), (1, 32, 8, torch.float32),
                                         (3, 16, 8, torch.float16), (1, 16, 8, torch.float64)])
def test_torch_executor_matches_reference(m, p, d, dtype):
    """The plan run by the torch executor (its steps as explicit implicit GEMMs on the re-laid
    weights, the kernels' epilogues) against the reference, forward and every gradient."""
    patches, tokens, weights = make_inputs(m, p, d, dtype)
    grad_out = torch.randn(m, 3, p, p).to(dtype)
    with poisoned_allocations():
        out = torch_head.patch_detailer_forward(patches, tokens, weights)
        got = torch_head.patch_detailer_backward(grad_out, patches, tokens, weights)
    hi = lambda t: t.double() if dtype != torch.float64 else t  # noqa: E731
    assert_close_to_fp64(out, ref.patch_detailer(patches, tokens, weights),
                         ref.patch_detailer(hi(patches), hi(tokens), [hi(w) for w in weights]))
    want = ref.patch_detailer_backward(grad_out, patches, tokens, weights)
    anchor = ref.patch_detailer_backward(hi(grad_out), hi(patches), hi(tokens), [hi(w) for w in weights])
    names = ["grad patches", "grad tokens"] + [f"grad {n}" for n in DETAILER_WEIGHT_NAMES]
    error = conformance.error_measure("patch_detailer", dtype)
    for name, g, lo, h in zip(names, [got[0], got[1], *got[2]], [want[0], want[1], *want[2]],
                              [anchor[0], anchor[1], *anchor[2]]):
        assert g.dtype == dtype, name
        assert_close_to_fp64(g, lo, h, name=name, error=error)


def test_interpreter_cases_cover_the_row_split_weight_gradient():
    """The GPU splits weight-gradient rows over programs; the catalogue's 3-patch detailer case runs
    that path on the interpreter too: several splits, the last one partial."""
    from dip_kernels.triton import patch_detailer as tri
    m = conformance.sample("patch_detailer", "3x16x32-strided").make(torch.float32, "cpu")[0].shape[0]
    bm = tri._config("weight_grad", 64)[0]
    rows = m * 16 * 16  # enc1 / dec1 / out at P=16
    splits, rows_per_split = tri._row_splits(rows, bm, tiles=1)
    assert splits >= 2 and (splits - 1) * rows_per_split < rows < splits * rows_per_split


def test_activation_memory_recompute_is_below_autograd_of_the_reference():
    for p in (16, 32):
        ours, autograd = plan.activation_bytes_per_patch(p, 1152)
        assert ours < autograd
        assert f"{ours:,} B" in plan.__doc__ and f"{autograd:,} B" in plan.__doc__  # the docstring's numbers


# ---------------------------------------------------------------- the one weight cache
class _Counting(torch_head.TorchExecutor):
    """The torch executor, counting its re-layouts and remembering the GEMM operands it read."""
    name = "counting"

    def __init__(self):
        self.relaid, self.read = 0, []

    def operand(self, layout, m, w):
        self.relaid += 1
        return super().operand(layout, m, w)

    def conv(self, step, out, sources, weight, *rest, **kw):
        self.read.append(weight)
        return super().conv(step, out, sources, weight, *rest, **kw)


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = plan.WeightCache()
    monkeypatch.setattr(plan, "CACHE", cache)
    return cache


def _fwd(ex, patches, tokens, weights):
    return plan.forward(ex, patches, tokens, weights)


def test_weight_cache_hits_and_follows_versioned_updates(fresh_cache):
    """A forward re-lays each weight once; the backward and a second forward reuse them; an
    in-place versioned update (an optimizer's step without fusing) or a new tensor is a miss."""
    ex = _Counting()
    patches, tokens, weights = make_inputs(1, 16, 8)
    first = _fwd(ex, patches, tokens, weights)
    relaid = ex.relaid
    _fwd(ex, patches, tokens, weights)
    assert ex.relaid == relaid  # all hits
    plan.backward(ex, torch.randn_like(patches), patches, tokens, weights)
    backward_only = ex.relaid - relaid  # the backward's own layouts (input-gradient convs)
    with torch.no_grad():
        weights[0].mul_(2)  # enc1's weight, versioned
    second = _fwd(ex, patches, tokens, weights)
    assert ex.relaid == relaid + backward_only + 1  # only enc1's forward operand again
    assert not torch.allclose(first, second)
    _fwd(ex, patches, tokens, [w.clone() for w in weights])
    assert ex.relaid == 2 * relaid + backward_only + 1  # new tensors: every forward layout again


def test_weight_cache_sees_a_fused_optimizer_step(fresh_cache):
    """Fused AdamW writes parameters in place without bumping their version counters: the cache is
    emptied by every optimizer step, so the next forward re-lays the updated weights."""
    ex = _Counting()
    patches, tokens, weights = make_inputs(2, 16, 8)
    params = [nn.Parameter(w) for w in weights]
    for q in params:
        q.grad = torch.randn_like(q)
    with torch.no_grad():
        first = _fwd(ex, patches, tokens, params)
        versions = [q._version for q in params]
        torch.optim.AdamW(params, lr=0.1, fused=True).step()
        assert [q._version for q in params] == versions  # the premise: no version bump
        second = _fwd(ex, patches, tokens, params)
    assert not torch.allclose(first, second)
    assert_close_to_fp64(second, ref.patch_detailer(patches, tokens, [q.detach() for q in params]),
                         ref.patch_detailer(patches.double(), tokens.double(), [q.detach().double() for q in params]))


def test_weight_cache_is_bypassed_while_a_graph_is_captured(fresh_cache, monkeypatch):
    """While a CUDA graph is captured every re-layout is made afresh (so the graph records it and a
    replay re-lays the weights of that moment: an in-place optimizer step is seen) and nothing is
    stored (no replay reads a cache entry that may be evicted and freed)."""
    ex = _Counting()
    patches, tokens, weights = make_inputs(1, 16, 8)
    _fwd(ex, patches, tokens, weights)
    entries = dict(fresh_cache.entries)
    cached = {id(t) for _, t in entries.values()}
    monkeypatch.setattr(plan, "capturing", lambda t: True)
    with torch.no_grad():
        weights[0].mul_(2.0)  # an optimizer step before the capture
    ex.read = []
    out = _fwd(ex, patches, tokens, weights)
    plan.backward(ex, torch.randn_like(patches), patches, tokens, weights)
    assert ex.read and not any(id(w) in cached for w in ex.read)
    assert fresh_cache.entries.keys() == entries.keys()  # nothing stored, nothing evicted
    assert_close_to_fp64(out, ref.patch_detailer(patches, tokens, weights),
                         ref.patch_detailer(patches.double(), tokens.double(), [w.double() for w in weights]))


def test_weight_cache_skips_tensors_it_cannot_key():
    patches, tokens, weights = make_inputs(1, 16, 8)
    layout = plan.Layout("enc1.weight", "conv")
    with torch.inference_mode():
        frozen = weights[0].clone()
    assert plan.WeightCache.key("x", layout, frozen) is None  # no version counter
    assert plan.WeightCache.key("x", layout, torch.empty(64, 3, 3, 3, device="meta")) is None
    assert plan.WeightCache.key("x", layout, weights[0]) is not None


# ---------------------------------------------------------------- GPU: real sizes, training
@pytest.mark.gpu
@pytest.mark.parametrize("m,p", [(512, 16), (8192, 16), (128, 32), (1, 32)])
def test_triton_bf16_real_sizes(backend, m, p):
    # the high-precision anchor is fp32 (fp64 at M=8192 would be slow), computed without TF32
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        backend("triton", "patch_detailer")
        conformance.check_against_reference("patch_detailer", "triton", make_inputs(m, p, 1152, torch.bfloat16, "cuda"),
                                            high_precision=torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _train(backend_name, backend, steps=30):
    torch.manual_seed(1234)
    d = 64
    weights = [nn.Parameter(w) for w in conformance.detailer_weights(d, torch.float32, "cuda")]
    teacher = conformance.detailer_weights(d, torch.float32, "cuda")
    patches = torch.randn(256, 3, 16, 16, device="cuda")
    tokens = torch.randn(256, d, device="cuda")
    with torch.no_grad():
        target = ref.patch_detailer(patches, tokens, teacher)
    opt = torch.optim.AdamW(weights, lr=1e-3, fused=True)  # as dip.train: no version bumps
    backend(backend_name, "patch_detailer")
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = dip_kernels.patch_detailer(patches, tokens, list(weights))
        loss = (out.float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).cpu()


@pytest.mark.gpu
def test_triton_training_matches_the_reference(backend):
    reference = _train("reference", backend)
    triton_losses = _train("triton", backend)
    assert triton_losses[-1] < 0.7 * triton_losses[0]  # it learns
    # bf16 rounding differs between the two, and AdamW amplifies tiny gradient differences over
    # steps, so the curves agree to bf16-level relative error rather than bitwise
    torch.testing.assert_close(triton_losses, reference, rtol=3e-2, atol=1e-4)
