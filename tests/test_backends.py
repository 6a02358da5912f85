"""The conformance suite: every dip op on every backend that runs here, over each op's sample
catalogue (tests/conformance.py: batch 1, tails, non-contiguous inputs, the sizes that take every
split and tile path), against the reference (dip_kernels/reference).

Each case runs the custom op forward and backward through autograd with every allocation
poisoned (dip_kernels.testing.poisoned_allocations) and asserts the backend that ran both
(ran_on). The ground truth is the reference forward (dip_kernels/reference) differentiated by
torch's autograd, in the inputs' own dtypes and in float64: a result may err against float64 at
most ``factor`` times what the reference itself errs in the same dtype, plus a scale-aware atol
(assert_close_to_fp64, the flash-attention tests' rule); the reference backend is judged the same way,
which checks the op layer and the reference's written-out backward. Copies (patchify) must match
the reference bit for bit. Every backend also passes torch.library.opcheck, compiles forward and
backward under torch.compile(fullgraph=True) (no graph break) to the same results, and, on a GPU,
captures forward and backward in one CUDA graph whose replays on new input values give the bits an
uncaptured call gives. A new op gets all of this from its catalogue entries in tests/conformance.py
(SAMPLES, CHECKS, OPCHECK, CAPTURE).

CPU: the reference, Triton through its interpreter (float32, float16) and the detailer's onednn
backend. With a
GPU: the same catalogue on CUDA tensors in bfloat16, every backend that runs them (gpu-marked).
"""
import inspect

import pytest
import torch

import dip_kernels
from dip_kernels import backends
from dip_kernels.opspec import SPECS
from dip_kernels.testing import ran_on

import conformance

HAS_GPU = torch.cuda.is_available()


def _backends_here(op, device):
    return dip_kernels.available_backends(backends.op_family(op), device)


# every backend; onednn (the detailer's CPU schedule) runs CPU tensors only
BACKEND_DEVICES = {"reference": ("cpu", "cuda"), "triton": ("cpu", "cuda"), "cuda": ("cpu", "cuda"), "onednn": ("cpu",)}


def _params(device):
    out = []
    for op in SPECS:
        for name, devices in BACKEND_DEVICES.items():
            if not backends.has_backend(op, name) or device not in devices:
                continue
            runs = name in _backends_here(op, device) if device == "cpu" else True
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if not runs:
                marks.append(pytest.mark.skip(reason=f"{name} does not run {device} tensors here"))
            dtypes = conformance.CHECKS[op].gpu_dtypes if device == "cuda" else None
            for case in conformance.cases(op, dtypes):
                dtype, sample = case.values
                if name == "reference" and sample.slow and dtype != torch.float32:
                    continue  # the reference on itself: once per slow sample (CPU half convs are slow)
                out.append(pytest.param(op, name, device, dtype, sample, marks=list(case.marks) + marks,
                                        id=f"{op}-{name}-{device}-{case.id}"))
    return out


@pytest.mark.parametrize("op,name,device,dtype,sample", _params("cpu") + _params("cuda"))
def test_backend_matches_reference(backend, op, name, device, dtype, sample):
    backend(name, backends.op_family(op))
    conformance.check_against_reference(op, name, sample.make(dtype, device))


def _per_backend_params(interpreted_detailer_mark):
    """(op, backend, device) for every backend of every op; the Triton detailer on CPU (minutes under
    the interpreter) gets ``interpreted_detailer_mark``."""
    out = []
    for op in SPECS:
        for name, devices in BACKEND_DEVICES.items():
            if not backends.has_backend(op, name):
                continue
            for device in devices:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                if device == "cpu" and name not in _backends_here(op, "cpu"):
                    marks.append(pytest.mark.skip(reason=f"{name} does not run cpu tensors here"))
                if op == "patch_detailer" and name == "triton" and device == "cpu":
                    marks.append(interpreted_detailer_mark)
                out.append(pytest.param(op, name, device, marks=marks, id=f"{op}-{name}-{device}"))
    return out


def _opcheck_params():
    return _per_backend_params(pytest.mark.slow)


# opcheck's AOT-dispatch checks run the op again under AOTAutograd and compare with eager mode: for the
# Triton detailer under the interpreter that is 40 s of the very kernels test_backend_matches_reference
# checks, and AOT dispatch depends on the op's registration, not on its backend (the reference and GPU
# runs cover it); there, the checks that run the kernels are the schema check (no input mutated or
# aliased) and the autograd registration's
INTERPRETED_HEAD_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op,name,device", _opcheck_params())
def test_opcheck(backend, op, name, device):
    """torch.library.opcheck of the op (schema, fake, autograd registration, AOT dispatch) and of
    its backward op, on this backend (asserted)."""
    spec = SPECS[op]
    backend(name, backends.op_family(op))
    checks = {}
    if op == "patch_detailer" and name == "triton" and backends.triton_interpreted():
        checks = dict(test_utils=INTERPRETED_HEAD_CHECKS)
    for make in (conformance.OPCHECK_GPU if device == "cuda" else conformance.OPCHECK)[op]:
        args = make(device)
        leaves = conformance.leaves(args, conformance.grads_of(spec, args))
        with ran_on(name):
            torch.library.opcheck(getattr(torch.ops.dip, op).default, tuple(leaves), **checks)
        if spec.backward is None:
            continue
        # the backward op on its own: the saved inputs and outputs of one forward
        with torch.no_grad():
            outs = getattr(torch.ops.dip, op)(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        value = dict(zip(inspect.signature(spec.signature).parameters, args))
        value.update(zip(spec.outputs, outs))
        grads = [torch.randn_like(outs[i]) for i in conformance.differentiable(spec)]
        bargs = tuple(grads + [value[n] for n in spec.backward.saves] + [value[n] for n in spec.backward.attrs])
        with ran_on(name):
            torch.library.opcheck(getattr(torch.ops.dip, f"{op}_backward").default, bargs, **checks)


def test_catalogue_covers_batch_one_tails_and_strided_inputs():
    """Every op's catalogue holds a batch of one, a size that is no multiple of 16 and a
    non-contiguous input."""
    for op, samples in conformance.SAMPLES.items():
        made = [s.make(torch.float32, "cpu") for s in samples]
        tensors = [[t for t in dip_kernels.opspec._tensors(args)] for args in made]
        assert any(ts[0].shape[0] == 1 for ts in tensors), f"{op}: no batch of one"
        assert any(any(d % 16 for d in ts[0].shape) for ts in tensors), f"{op}: no tail"
        assert any(not t.is_contiguous() for ts in tensors for t in ts), f"{op}: no non-contiguous input"


def _compile_params():
    # minutes of interpreted detailer kernels, run twice; what torch.compile checks (the op's
    # registration, fake and autograd formula) is the same for every backend, and the GPU run compiles
    # the Triton detailer
    return _per_backend_params(pytest.mark.skip(reason="the interpreted Triton detailer: see the cuda case"))


@pytest.mark.parametrize("op,name,device", _compile_params())
def test_compiles_fullgraph(backend, op, name, device):
    """torch.compile(fullgraph=True) of a function around the op (a graph break raises) runs the op
    and its backward on this backend (asserted) and gives what the uncompiled op gives."""
    spec = SPECS[op]
    backend(name, backends.op_family(op))
    custom_op = getattr(torch.ops.dip, op)
    args = (conformance.OPCHECK_GPU if device == "cuda" else conformance.OPCHECK)[op][0](device)
    grad_outputs = conformance.grad_outputs_for(op, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: custom_op(*a), fullgraph=True, backend="aot_eager")
    wrt = conformance.grads_of(spec, args)
    with ran_on(name) as runs:
        got = conformance.outputs_and_grads(compiled, spec, conformance.leaves(args, wrt), grad_outputs)
    assert len(runs) == 2, [c.op for c in runs]  # the op and its backward
    want = conformance.outputs_and_grads(custom_op, spec, conformance.leaves(args, wrt), grad_outputs)
    for label, g, w in zip(conformance._names(spec, args), got, want):
        if conformance.CHECKS[op].exact:  # a copy: bit for bit
            assert torch.equal(g, w), label
        else:
            torch.testing.assert_close(g, w, msg=label)


def _capture_params():
    return [pytest.param(op, name, marks=[pytest.mark.gpu], id=f"{op}-{name}")
            for op in SPECS for name, devices in BACKEND_DEVICES.items()
            if backends.has_backend(op, name) and "cuda" in devices]


def _refill(args, fresh):
    """Copy ``fresh``'s values into ``args``'s tensors, in place (what a CUDA graph reads)."""
    with torch.no_grad():
        for a, f in zip(args, fresh):
            for t, u in zip(a if isinstance(a, list) else [a], f if isinstance(f, list) else [f]):
                if isinstance(t, torch.Tensor):
                    t.copy_(u)


@pytest.mark.parametrize("op,name", _capture_params())
def test_cuda_graph_capture(backend, op, name):
    """The op and its backward on this backend captured in one CUDA graph (current stream, no host
    sync): replays on new input values, written in place, give exactly what an uncaptured call gives."""
    spec = SPECS[op]
    if name not in _backends_here(op, "cuda"):
        pytest.skip(f"{name} does not run cuda tensors here")
    backend(name, backends.op_family(op))
    custom_op = getattr(torch.ops.dip, op)
    raw = conformance.CAPTURE[op]("cuda")
    args = conformance.leaves(raw, conformance.grads_of(spec, raw))
    grad_outputs = conformance.grad_outputs_for(op, args)

    def step():
        return conformance.outputs_and_grads(custom_op, spec, args, grad_outputs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, autotune and fill caches outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with ran_on(name), torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        _refill(args, conformance.CAPTURE[op]("cuda"))
        _refill(grad_outputs, [torch.randn_like(g) for g in grad_outputs])
        graph.replay()
        torch.cuda.synchronize()
        with ran_on(name):
            want = step()
        for label, got, expected in zip(conformance._names(spec, args), captured, want):
            assert torch.equal(got, expected), label
