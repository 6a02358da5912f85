"""The onednn backend of the Patch Detailer Head (dip_kernels/onednn/patch_detailer.py) against the
reference: forward and every gradient through torch.ops.dip.patch_detailer with poisoned
allocations, errors judged against fp64 (tests/conformance.py, which tests/test_backends.py also
runs over the detailer's catalogue on this backend), at the shapes its own paths need; its dense 2x2
GEMM form of a conv3x3 against F.conv2d; fresh weights under in-place updates; the forward it keeps
for its backward; the whole DiP model on it against the independent functional spec; and how it is
selected."""
import pytest
import torch
import torch.nn.functional as F

import dip_kernels
from dip_kernels import backends
from dip_kernels.onednn import patch_detailer as onednn
from dip_kernels.reference import patch_detailer as ref
from dip_kernels.testing import assert_close_to_fp64, poisoned_allocations, ran_on

import conformance
from conformance import detailer_inputs as make_inputs


# M=17: an odd patch count; P=32 runs the 2x2 bottleneck (no dense conv level) and the 4x4 level
# on oneDNN, P=16 the dense 2x2 level; d=768 is the demo's token width
@pytest.mark.parametrize("m,p,d,dtype", [
    (3, 16, 32, torch.float32),
    (17, 16, 768, torch.float32),
    (2, 32, 8, torch.float32),
    (2, 16, 8, torch.float64),
    (2, 16, 16, torch.bfloat16),
])
def test_onednn_matches_reference(backend, m, p, d, dtype):
    backend("onednn", "patch_detailer")
    conformance.check_against_reference("patch_detailer", "onednn", make_inputs(m, p, d, dtype))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_dense_conv3_is_the_convolution(size):
    ci, co, m = 5, 7, 4
    w = torch.randn(co, ci, 3, 3, dtype=torch.float64)
    x = torch.randn(m, ci, size, size, dtype=torch.float64)
    want = F.conv2d(x, w, padding=1)
    x_rows = x.permute(0, 2, 3, 1).reshape(m, -1)  # (pixel, channel) per patch, like the backend's NHWC
    got = (x_rows @ onednn.dense_conv3_matrix(w, size).t()).view(m, size, size, co).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # weight gradient: per tap, only the pixel pairs inside the kernel
    w_leaf = w.clone().requires_grad_(True)
    g_out = torch.randn_like(want)
    (want_gw,) = torch.autograd.grad(F.conv2d(x, w_leaf, padding=1), w_leaf, g_out)
    got_gw = onednn.dense_conv3_weight_grad(g_out.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), size)
    torch.testing.assert_close(got_gw, want_gw, rtol=1e-12, atol=1e-12)


def test_fresh_weights_after_an_unversioned_in_place_update(backend):
    # fused AdamW updates the weights in place without bumping their version counters: nothing
    # derived from the weights may outlive a call (a version-keyed cache would serve stale ones)
    patches, tokens, weights = make_inputs(2, 16, 8)
    params = [torch.nn.Parameter(w) for w in weights]
    for p in params:
        p.grad = torch.randn_like(p)
    backend("onednn", "patch_detailer")
    with ran_on("onednn"):
        first = dip_kernels.patch_detailer(patches, tokens, params)
    versions = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    assert [p._version for p in params] == versions  # the premise: no version bump
    second = dip_kernels.patch_detailer(patches, tokens, params)
    with torch.no_grad():
        want = ref.patch_detailer(patches.double(), tokens.double(), [w.double() for w in params])
        want_lo = ref.patch_detailer(patches, tokens, list(params))
    assert not torch.allclose(first, second)
    assert_close_to_fp64(second, want_lo, want, name="out after a fused AdamW step")


def test_backward_takes_the_kept_forward_only_for_its_own_inputs():
    a = make_inputs(2, 16, 8)
    b = make_inputs(2, 16, 8)
    for t in a[2] + b[2]:
        t.requires_grad_(True)  # what makes the forward keep its activations
    g = torch.randn(2, 3, 16, 16)
    with poisoned_allocations():
        fresh = onednn.patch_detailer_backward(g, *a)  # nothing kept: recomputes
        onednn.patch_detailer_forward(*a)
        assert onednn._last_forward.kept[1] is not None
        kept = onednn.patch_detailer_backward(g, *a)  # takes what the forward kept
        assert onednn._last_forward.stamps is None  # and forgets it
        onednn.patch_detailer_forward(*b)
        other = onednn.patch_detailer_backward(g, *a)  # b's activations are not a's: recomputes
    for x, y, z in zip([fresh[0], fresh[1], *fresh[2]], [kept[0], kept[1], *kept[2]],
                       [other[0], other[1], *other[2]]):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
        torch.testing.assert_close(z, x, rtol=0, atol=0)
    patches, tokens, weights = a
    onednn.patch_detailer_forward(patches, tokens, weights)
    with torch.no_grad():
        weights[0].add_(1.0)  # a versioned in-place update between forward and backward
    assert onednn._last_forward.take([patches, tokens, *weights]) is None
    onednn.patch_detailer_forward(patches, tokens, [w.detach() for w in weights])  # nothing requires grad
    assert onednn._last_forward.kept[1] is None


def test_model_on_onednn_backend_matches_functional_spec(backend):
    from dip import models
    from test_models import _check_against_functional, make_inputs as model_inputs, randomize_
    backend("onednn", "patch_detailer")
    model = randomize_(models.DiPTiny(head="patch_detailer"))
    x, t, y = model_inputs(model, height=32, width=48)
    _check_against_functional(model, x, t, y)


def test_selection(backend):
    assert "onednn" in dip_kernels.available_backends("patch_detailer", "cpu")
    assert "onednn" not in dip_kernels.available_backends("patch_detailer", "cuda")
    backend("auto")
    assert backends.resolve("patch_detailer", "cpu") == "reference"  # auto keeps the ground truth on CPU
    patches, tokens, weights = make_inputs(1, 16, 8)
    assert "not onednn: auto never picks it" in dip_kernels.explain("patch_detailer", patches, tokens, weights)
    backend("onednn")  # every op that has an onednn backend: only the detailer
    assert backends.resolve("patch_detailer", "cpu") == "onednn"
    assert (dip_kernels.explain("patch_detailer", patches, tokens, weights)
            == "dip.patch_detailer: onednn (onednn selected)")
    assert dip_kernels.get_backend("attention") == "auto"
    with pytest.raises(dip_kernels.BackendUnavailableError, match="runs cpu tensors, got cuda"):
        backends.resolve("patch_detailer", "cuda")
    with pytest.raises(dip_kernels.BackendUnavailableError, match="has no onednn implementation"):
        backend("onednn", "attention")
