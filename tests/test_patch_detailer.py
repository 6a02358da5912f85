"""The Patch Detailer Head op: the eager reference against an nn.Module built from torch's own
layers, the custom-op layer (opcheck, gradcheck, fake shapes, torch.compile, input checks), and
the Triton backend against the reference (interpreter on CPU in float32 / float16; bf16 at real
sizes, a short training run and CUDA-graph capture on a GPU).

The head's channel counts (64..1024) are fixed by the architecture, so even one patch is a lot of
work for Triton's CPU interpreter: the interpreter tests use M <= 3 patches and a small token
dim, and go through the op (forward, then autograd's backward, which recomputes the forward)."""
import pytest
import torch
from torch import nn

import dip_kernels
from dip_kernels import HEAD_WEIGHT_NAMES
from dip_kernels.reference import patch_detailer as ref
from dip_kernels.reference.patch_detailer import head_weight_shapes
from dip_kernels.testing import assert_close_to_fp64, poisoned_allocations, ran_on



def _openblas_thread_controls():
    """(get, set) of the OpenBLAS that numpy loaded, or None."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                          ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, set_):
                return getattr(lib, get), getattr(lib, set_)
    return None


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_numpy_blas():
    # Triton's interpreter runs tl.dot as numpy matmuls on small tiles; on a shared CPU, OpenBLAS's
    # thread pool makes those cost about 3x the CPU time of one thread
    controls = _openblas_thread_controls() if dip_kernels.backends.triton_interpreted() else None
    if controls is None:
        yield
        return
    get, set_ = controls
    old = get()
    set_(1)
    try:
        yield
    finally:
        set_(old)


class Head(nn.Module):
    """The head written with torch's layers, independently of the reference's functional form."""

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


def make_weights(token_dim, dtype=torch.float32, device="cpu"):
    """torch's default initialisation (activations stay O(1) through the head), biases widened
    so that they matter."""
    head = Head(token_dim)
    state = head.state_dict()
    weights = []
    for name in HEAD_WEIGHT_NAMES:
        w = state[name].clone()
        if name.endswith("bias"):
            w = w + 0.1 * torch.randn_like(w)
        weights.append(w.to(device=device, dtype=dtype))
    return weights


def make_inputs(m, p, d, dtype=torch.float32, device="cpu"):
    patches = torch.randn(m, 3, p, p, device=device).to(dtype)
    tokens = torch.randn(m, d, device=device).to(dtype)
    return patches, tokens, make_weights(d, dtype, device)


# ---------------------------------------------------------------- reference sanity
@pytest.mark.parametrize("p", [16, 32])
def test_reference_matches_torch_layers_fp64(p):
    d = 8
    head = Head(d).double()
    patches = torch.randn(2, 3, p, p, dtype=torch.float64)
    tokens = torch.randn(2, d, dtype=torch.float64)
    weights = [head.state_dict()[n] for n in HEAD_WEIGHT_NAMES]
    assert [tuple(w.shape) for w in weights] == head_weight_shapes(d)
    torch.testing.assert_close(ref.patch_detailer(patches, tokens, weights), head(patches, tokens),
                               rtol=1e-12, atol=1e-12)


def test_flops_per_patch_matches_the_anchor_arithmetic():
    # docs / ANCHORS.md: 133.8 MFLOP per 16x16 patch with the XL token dim 1152
    assert abs(ref.flops_per_patch(16, 1152) / 1e6 - 133.8) < 0.1


# ---------------------------------------------------------------- the eager op
def test_opcheck_eager():
    patches, tokens, weights = make_inputs(2, 16, 8)
    for t in (patches, tokens, *weights):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.dip.patch_detailer, (patches, tokens, weights))


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
        weights = [torch.empty(s, dtype=torch.bfloat16) for s in head_weight_shapes(24)]
        out = torch.ops.dip.patch_detailer(patches, tokens, weights)
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.bfloat16
        g_p, g_t, g_w = torch.ops.dip.patch_detailer_backward(out, patches, tokens, weights)
        assert g_p.shape == patches.shape and g_t.shape == tokens.shape
        assert [g.shape for g in g_w] == [w.shape for w in weights]
        with pytest.raises(ValueError, match="patches"):
            torch.ops.dip.patch_detailer(patches[:, :2], tokens, weights)


def test_compiles_without_graph_break():
    patches, tokens, weights = make_inputs(2, 16, 8)
    weights = [w.requires_grad_(True) for w in weights]

    def loss_fn(p, t, ws):
        return dip_kernels.patch_detailer(p, t, ws).square().mean()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(patches, tokens, weights)
    grads = torch.autograd.grad(loss, weights)
    want_loss = loss_fn(patches, tokens, weights)
    want_grads = torch.autograd.grad(want_loss, weights)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


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


# ---------------------------------------------------------------- triton against the reference
def _run_op(patches, tokens, weights, grad_out):
    """Forward and every gradient through torch.ops.dip.patch_detailer (whichever backend)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (patches, tokens, *weights)]
    out = dip_kernels.patch_detailer(leaves[0], leaves[1], leaves[2:])
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _reference(patches, tokens, weights, grad_out, dtype, device=None):
    """Forward and every gradient of the eager reference, inputs cast to dtype."""
    cast = lambda t: t.detach().to(device=device or t.device, dtype=dtype)  # noqa: E731
    p, t, ws, g = cast(patches), cast(tokens), [cast(w) for w in weights], cast(grad_out)
    out = ref.patch_detailer_forward(p, t, ws)
    g_p, g_t, g_w = ref.patch_detailer_backward(g, p, t, ws)
    return [out, g_p, g_t, *g_w]


RESULT_NAMES = ["out", "grad patches", "grad tokens"] + [f"grad {n}" for n in HEAD_WEIGHT_NAMES]


def _check_triton(backend, m, p, d, dtype, device="cpu", hi_dtype=torch.float64):
    patches, tokens, weights = make_inputs(m, p, d, dtype, device)
    grad_out = torch.randn(m, 3, p, p, device=device).to(dtype)
    want_hi = _reference(patches, tokens, weights, grad_out, hi_dtype)
    want_lo = _reference(patches, tokens, weights, grad_out, dtype)
    backend("triton", "patch_detailer")
    with poisoned_allocations(), ran_on("triton") as runs:
        got = _run_op(patches, tokens, weights, grad_out)
    assert [c.op for c in runs] == ["patch_detailer", "patch_detailer_backward"]
    for name, g, lo, hi in zip(RESULT_NAMES, got, want_lo, want_hi):
        assert g.dtype == dtype, name
        assert_close_to_fp64(g, lo, hi, name=name)


# The interpreter's cost is set by the head's fixed channel counts: about 15 s of CPU per
# patch-batch for forward + backward at P=16, M=1; M=3 adds little (one tile covers the rows).
@pytest.mark.parametrize("m,p,d,dtype", [
    (1, 16, 8, torch.float32),
    (3, 16, 32, torch.float32),
    (1, 16, 16, torch.float16),
])
def test_triton_matches_reference(backend, m, p, d, dtype):
    _check_triton(backend, m, p, d, dtype)


def test_triton_matches_reference_p32(backend):
    _check_triton(backend, 1, 32, 8, torch.float32)


def test_triton_weight_relayout_is_cached_and_follows_updates(backend):
    from dip_kernels.triton import patch_detailer as tri
    patches, tokens, weights = make_inputs(1, 16, 8)
    backend("triton", "patch_detailer")
    first = tri._conv_w(weights, "enc1.weight")
    assert tri._conv_w(weights, "enc1.weight") is first  # one re-layout per weight version
    weights[0].mul_(2)  # an optimizer's in-place step bumps the version
    second = tri._conv_w(weights, "enc1.weight")
    assert second is not first
    torch.testing.assert_close(second, 2 * first)


def test_triton_weight_cache_is_bypassed_under_graph_capture(monkeypatch):
    """While a CUDA graph is captured every re-layout is made afresh (recorded in the graph) and
    nothing is cached: a replay must never read a cache entry, stale after an optimizer step."""
    from dip_kernels.triton import patch_detailer as tri
    _, _, weights = make_inputs(1, 16, 8)
    cached = tri._conv_w(weights, "enc2.weight")
    entries = dict(tri._cache)
    monkeypatch.setattr(tri, "capturing", lambda t: True)
    first, second = tri._conv_w(weights, "enc2.weight"), tri._conv_w(weights, "enc2.weight")
    assert first is not cached and second is not first and torch.equal(first, cached)
    assert tri._cache.keys() == entries.keys() and all(tri._cache[k] is entries[k] for k in entries)


def test_interpreter_cases_cover_the_row_split_weight_gradient():
    """The GPU splits weight-gradient rows over programs; test_triton_matches_reference's 3-patch
    case runs that path too: several splits, the last one partial."""
    from dip_kernels.triton import patch_detailer as tri
    bm = tri._config("weight_grad", 64)[0]
    rows = 3 * 16 * 16  # enc1 / dec1 / out at M=3, P=16
    splits, rows_per_split = tri._row_splits(rows, bm, tiles=1)
    assert splits >= 2 and (splits - 1) * rows_per_split < rows < splits * rows_per_split


def test_activation_memory_recompute_is_below_eager():
    from dip_kernels.triton.patch_detailer import activation_bytes_per_patch
    for p in (16, 32):
        ours, eager = activation_bytes_per_patch(p, 1152)
        assert ours < eager


# ---------------------------------------------------------------- GPU: real sizes, training, graphs
@pytest.mark.gpu
@pytest.mark.parametrize("m,p", [(512, 16), (8192, 16), (128, 32), (1, 32)])
def test_triton_bf16_real_sizes(backend, m, p):
    # the high-precision anchor is fp32 (fp64 at M=8192 would be slow), computed without TF32
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _check_triton(backend, m, p, 1152, torch.bfloat16, device="cuda", hi_dtype=torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _train(backend_name, backend, steps=30):
    torch.manual_seed(1234)
    d = 64
    weights = [nn.Parameter(w) for w in make_weights(d, torch.float32, "cuda")]
    teacher = make_weights(d, torch.float32, "cuda")
    patches = torch.randn(256, 3, 16, 16, device="cuda")
    tokens = torch.randn(256, d, device="cuda")
    with torch.no_grad():
        target = ref.patch_detailer(patches, tokens, teacher)
    opt = torch.optim.AdamW(weights, lr=1e-3)
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
def test_triton_training_matches_eager(backend):
    eager = _train("eager", backend)
    triton_losses = _train("triton", backend)
    assert triton_losses[-1] < 0.7 * triton_losses[0]  # it learns
    # bf16 rounding differs between the two, and AdamW amplifies tiny gradient differences over
    # steps, so the curves agree to bf16-level relative error rather than bitwise
    torch.testing.assert_close(triton_losses, eager, rtol=3e-2, atol=1e-4)


@pytest.mark.gpu
def test_triton_cuda_graph_forward_backward(backend):
    backend("triton", "patch_detailer")
    patches, tokens, weights = make_inputs(64, 16, 32, torch.bfloat16, "cuda")
    weights = [w.requires_grad_(True) for w in weights]
    grad_out = torch.randn(64, 3, 16, 16, device="cuda", dtype=torch.bfloat16)

    def step():
        out = dip_kernels.patch_detailer(patches, tokens, weights)
        grads = torch.autograd.grad(out, weights, grad_out)
        return out, grads

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step()
    # new values in place: the replay must see them (the weight re-layout is part of the graph)
    with torch.no_grad():
        patches.copy_(torch.randn_like(patches))
        weights[0].mul_(1.5)
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_grads = step()
    # the replay runs the very kernels eager runs: bit for bit the same
    assert torch.equal(static_out, want_out)
    for g, w in zip(static_grads, want_grads):
        assert torch.equal(g, w)
