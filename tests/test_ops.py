"""The op layer itself: backend selection, its errors, and CUDA-graph safety of every op.
Per-op correctness lives in the per-op test files (test_attention.py, test_patch_detailer.py, ...)."""
import os
import subprocess
import sys

import pytest
import torch

import dip_kernels
from dip_kernels import backends
from dip_kernels.reference.patch_detailer import detailer_weight_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT)


def test_unknown_backend_and_op_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        dip_kernels.set_backend("fastest")
    with pytest.raises(ValueError, match="op must be one of"):
        dip_kernels.set_backend("reference", op="conv")


def test_backend_an_op_lacks_names_what_it_has(backend):
    with pytest.raises(dip_kernels.BackendUnavailableError, match="has no cuda implementation"):
        backend("cuda", "patchify")


def test_cuda_backend_without_cuda_extension_says_how_to_get_it(backend):
    if "cuda" in dip_kernels.available_backends("patch_detailer", "cuda"):
        pytest.skip("the CUDA extension is built and usable here")
    with pytest.raises(dip_kernels.BackendUnavailableError, match="dip_kernels._C"):
        backend("cuda", "patch_detailer")


def test_auto_runs_the_reference_on_cpu(backend):
    backend("auto")
    for op in dip_kernels.OPS:
        assert backends.resolve(op, "cpu") == "reference"


def test_set_backend_for_all_ops_skips_ops_without_it(backend):
    backend("reference")
    assert all(dip_kernels.get_backend(op) == "reference" for op in dip_kernels.OPS)
    backend("auto", "attention")
    assert dip_kernels.get_backend("attention") == "auto"
    assert dip_kernels.get_backend("swiglu") == "reference"


def test_environment_variable_selects_backends():
    code = "import dip_kernels as d; print(d.get_backend('attention'), d.get_backend('swiglu'))"
    out = _run(code, DIP_KERNELS_BACKEND="reference,attention=auto")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["auto", "reference"]
    bad = _run(code, DIP_KERNELS_BACKEND="attention=magic")
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_triton_on_cpu_without_interpreter_explains_the_fix():
    code = ("import torch, dip_kernels as d\n"
            "ops = [o for o in d.OPS if 'triton' in d.backends._MODULES[o]]\n"
            "op = next(o for o in ops if d.backends._unavailable_reason(o, 'triton') is None)\n"
            "d.set_backend('triton', op='swiglu' if op == 'swiglu' else op)\n"
            "try:\n"
            "    d.backends.resolve(op, 'cpu')\n"
            "except d.BackendUnavailableError as e:\n"
            "    print('ERR', e)\n")
    out = _run(code, TRITON_INTERPRET="0")
    if "StopIteration" in out.stderr:
        pytest.skip("no triton kernels importable here")
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def _inputs(device, dtype, d=64, heads=4, grid=(4, 6), p=16, m=3, token_dim=32):
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    b, n = 2, grid[0] * grid[1]
    cos, sin = dip_kernels.rope_table(grid[0], grid[1], d // heads, device=device)
    return dict(
        p=p, heads=heads, images=rnd(b, 3, grid[0] * p, grid[1] * p),
        qkv=rnd(b, n, 3 * d), qw=rnd(d // heads), kw=rnd(d // heads), cos=cos, sin=sin,
        x=rnd(b, n, d), w=rnd(d), shift=rnd(b, d), scale=rnd(b, d), gate=rnd(b, d), ab=rnd(b, n, 2 * d),
        patches=rnd(m, 3, p, p), tokens=rnd(m, token_dim),
        detailer_weights=[rnd(*s) * 0.05 for s in detailer_weight_shapes(token_dim)])


def _every_op(a):
    """One call of each dip op; returns a scalar that depends on them all."""
    h, w = a["images"].shape[2:]
    back = dip_kernels.unpatchify(dip_kernels.patchify(a["images"], a["p"]), a["p"], h, w)
    att = dip_kernels.attention(a["qkv"], a["qw"], a["kw"], a["cos"], a["sin"], a["heads"])
    y = dip_kernels.rmsnorm_modulate(a["x"], a["w"], a["shift"], a["scale"])
    y = dip_kernels.gated_residual(a["x"], a["gate"], y)
    sw = dip_kernels.swiglu(a["ab"])
    head = dip_kernels.patch_detailer(a["patches"], a["tokens"], a["detailer_weights"])
    return back.sum() + att.sum() + y.sum() + sw.sum() + head.sum()


def test_every_op_compiles_in_one_graph():
    """No graph break across a function that calls every dip op (fullgraph would raise)."""
    torch._dynamo.reset()
    a = _inputs("cpu", torch.float32)
    compiled = torch.compile(_every_op, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(a), _every_op(a), rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_every_op_captures_in_a_cuda_graph():
    """No host sync and current-stream only: the whole set of ops (auto backends) captures and replays."""
    a = _inputs("cuda", torch.bfloat16)
    expected = _every_op(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _every_op(a)  # warm-up: kernel compilation and caches outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _every_op(a)
    graph.replay()
    torch.cuda.synchronize()
    # the replay runs the kernels the uncaptured call ran, on the same inputs: the same bits
    assert torch.equal(captured, expected)


def test_plain_reference_runs_the_reference_functions_without_custom_ops():
    """The benchmarks' baseline: same numbers, no torch.ops.dip call (so the compiler sees through)."""
    a = _inputs("cpu", torch.float32)
    expected = _every_op(a)
    with dip_kernels.plain_reference(), torch.profiler.profile() as prof:
        got = _every_op(a)
    dip_calls = sorted({e.name for e in prof.events() if e.name.startswith("dip::")})
    assert not dip_calls, dip_calls
    with torch.profiler.profile() as prof:
        _every_op(a)
    assert any(e.name.startswith("dip::") for e in prof.events()), "the profiler does not see dip ops"
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_auto_takes_the_first_backend_that_supports_the_inputs(gpu_machine):
    """On a GPU machine with the CUDA build: the order is each op's, the deciding input's dtype and
    shape decide, and the reason lists what was passed over."""
    head = lambda dtype, d=16: (torch.empty(2, 3, 16, 16, dtype=dtype), torch.empty(2, d, dtype=dtype))  # noqa: E731
    cases = [("patch_detailer", head(torch.bfloat16), "cuda"), ("patch_detailer", head(torch.float32), "triton"),
             ("patch_detailer", head(torch.float16, d=12), "triton"),
             ("attention", (torch.empty(1, 4, 3 * 64, dtype=torch.bfloat16),), "triton"),
             ("attention", (torch.empty(1, 4, 3 * 64, dtype=torch.float32),), "reference"),
             ("swiglu", (torch.empty(2, 8, dtype=torch.float64),), "triton")]
    for op, inputs, expected in cases:
        inputs = tuple(t.to("meta") for t in inputs)
        choice = backends._select(op, torch.device("cuda"), inputs)
        assert choice.backend == expected, (op, choice)
        assert choice.reason.startswith("auto on cuda tensors") and choice.reason.endswith(f"{expected} runs them")


def test_auto_order_is_the_specs_and_never_the_interpreter(backend):
    """Each op's backends in its spec's order, the reference last; auto on CPU tensors passes over
    Triton's interpreter (it runs only when chosen by name) and says so."""
    backend("auto")
    for op in dip_kernels.OPS:
        assert list(backends._MODULES[op])[-1] == "reference"
        assert dip_kernels.available_backends(op, "cpu")[-1] == "reference"
    reason = backends._select("swiglu", torch.device("cpu"), (torch.ones(2),)).reason
    expected = "auto picks it for cuda tensors" if backends.triton_interpreted() else "it runs cuda tensors"
    assert f"not triton: {expected}, got cpu" in reason and reason.endswith("reference runs them")


def test_production_code_imports_no_test_helpers_and_no_dispatch_key_guards():
    """Kernels and the op layer do not import dip_kernels.testing, and nothing re-enters autograd
    through torch._C's private dispatch-key guards."""
    package = os.path.join(ROOT, "dip_kernels")
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py") or name == "testing.py":
                continue
            text = open(os.path.join(folder, name)).read()
            assert "testing import" not in text and "import testing" not in text, name
            assert "_ForceDispatchKeyGuard" not in text and "_dispatch_tls" not in text, name


@pytest.mark.parametrize("old,new", sorted(backends.RENAMED.items()))
def test_old_backend_names_still_select_with_a_deprecation_warning(backend, old, new):
    """``eager`` is now ``reference`` and ``cpu`` (the detailer's oneDNN schedule) ``onednn``: the
    old names select the new backends, say so, and get_backend answers with the new name."""
    op = "patch_detailer"
    with pytest.warns(DeprecationWarning, match=f"backend '{old}' is now called '{new}'"):
        backend(old, op)
    assert dip_kernels.get_backend(op) == new
    code = "import dip_kernels as d; print(d.get_backend('patch_detailer'))"
    out = _run(code, DIP_KERNELS_BACKEND=f"patch_detailer={old}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [new]


def test_every_op_is_found_by_its_name():
    """``grep -rn "def <op>"`` finds each op's spec (its signature ``<op>_signature``), its public
    function, the reference's ``<op>_forward`` and every backend module's ``<op>_forward``."""
    import inspect
    from dip_kernels.opspec import SPECS
    for op, spec in SPECS.items():
        assert spec.signature.__name__ == f"{op}_signature", op
        public = getattr(dip_kernels, op)
        assert public.__name__ == op and inspect.getmodule(public) is inspect.getmodule(spec.signature), op
        for backend_name in backends._MODULES[spec.op_family]:
            assert backends.backend_function(op, backend_name).__name__ == f"{op}_forward", (op, backend_name)
