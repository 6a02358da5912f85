"""One spec per custom op, and the factory that turns it into ``torch.ops.dip.<name>``.

An ``OpSpec`` declares, once: the signature (an annotated stub named ``<name>_signature``, so
that ``grep -rn "def <name>"`` finds the spec beside the reference and the kernels' wrappers;
torch.library infers the schema from it), the names of its outputs, the input check (a ValueError
naming the argument; it runs in the real and in the fake implementation, so bad input fails before
any kernel runs, eagerly and under torch.compile alike), the fake (the outputs' shapes and dtypes), the backends that implement
it, and its derivative: either a ``Backward`` (which forward inputs and outputs the backward op
receives, which non-tensor arguments, which inputs it returns gradients for) or, for an op whose
derivative is another dip op (patchify / unpatchify), the autograd functions themselves.

``define(spec)`` registers, the way torch.library expects: the custom op (``custom_op`` with the
inferred schema), its fake, the backward op ``dip::<name>_backward`` (schema, fake and
implementation derived from the Backward), and the autograd formula between them. Every
implementation checks nothing more than the spec says, runs the backend dip_kernels.backends
chooses for the inputs (and records it), and returns contiguous outputs that never alias an input
(what every fake promises). Nothing here syncs with the host.

A backend module implements ``<name>_forward(*inputs)`` and ``<name>_backward(*backward_inputs)``
with the custom ops' own argument lists, and returns contiguous outputs.
"""
import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import backends


@dataclass(frozen=True)
class Backward:
    """The backward op ``dip::<op>_backward(grad_<output>..., *saves, *attrs) -> gradients``."""
    saves: Tuple[str, ...]                 # forward inputs and outputs it receives, in this order
    grads: Tuple[str, ...]                 # forward inputs whose gradients it returns, in this order
    attrs: Tuple[str, ...] = ()            # non-tensor forward arguments it receives after the saves
    grad_outputs: Optional[Tuple[str, ...]] = None  # outputs whose gradients it takes (None: all);
    #                                                 the others are marked non-differentiable


@dataclass(frozen=True)
class OpSpec:
    name: str                              # torch.ops.dip.<name>
    signature: Callable                    # annotated stub: argument names, types and defaults
    outputs: Tuple[str, ...]               # output names (the backward's gradient arguments: grad_<name>)
    check: Callable                        # check(*inputs) raises ValueError naming the argument
    fake: Callable                         # fake(*inputs) -> outputs allocated like the real ones
    backends: Dict[str, str]               # backend -> module, fastest first (the reference last)
    dispatch: int = 1                      # leading inputs the backend is chosen from
    family: Optional[str] = None           # the backend modules' op family (default: name)
    backward: Optional[Backward] = None
    autograd: Optional[Tuple[Callable, Callable]] = None  # (setup_context, backward) when no Backward

    @property
    def op_family(self):
        return self.family or self.name


SPECS: Dict[str, OpSpec] = {}  # every defined op, forward ops by name


def fresh(outputs, inputs):
    """A custom op's outputs as its fake promises them: contiguous, and never sharing memory with
    an input (a copy of any output that does; backends return such outputs only where a kernel
    would have copied anyway, e.g. the reference's transposes)."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}

    def fix(t):
        if not isinstance(t, Tensor) or not t.numel():
            return t
        if t.untyped_storage().data_ptr() in ptrs:
            return t.clone(memory_format=torch.contiguous_format)
        return t.contiguous()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(fix(t) if not isinstance(t, list) else [fix(u) for u in t] for t in outputs)
    return fix(outputs)


def _tensors(args):
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _binder(signature):
    def bind(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())
    return bind


def _contiguous_like(t):
    if isinstance(t, (list, tuple)):
        return [_contiguous_like(u) for u in t]
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _with_signature(fn, signature, name):
    fn.__signature__ = signature
    fn.__name__ = fn.__qualname__ = name
    return fn


def _backward_signature(spec, fwd):
    """The backward op's signature, built from the forward's parameters by name."""
    bw = spec.backward
    grad_outputs = bw.grad_outputs or spec.outputs
    params = [inspect.Parameter(f"grad_{o}", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Tensor)
              for o in grad_outputs]
    for name in bw.saves + bw.attrs:
        p = fwd.parameters.get(name)
        annotation = p.annotation if p is not None else Tensor  # a forward output
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation))
    returns = [fwd.parameters[g].annotation for g in bw.grads]
    ret = returns[0] if len(returns) == 1 else Tuple[tuple(returns)]
    return inspect.Signature(params, return_annotation=ret)


def _choose_inputs(spec, args):
    """The forward's leading inputs, from which the backend is chosen."""
    return args[:spec.dispatch]


def define(spec: OpSpec):
    """Register ``spec`` as torch.ops.dip.<name> (and its backward op); returns the custom op."""
    backends.register(spec.name, spec.op_family, spec.backends)
    sig = inspect.signature(spec.signature)
    bind = _binder(sig)
    names = list(sig.parameters)

    def forward_impl(*args, **kwargs):
        a = bind(*args, **kwargs)
        spec.check(*a)
        fn = backends.implementation(spec.name, *_choose_inputs(spec, a))
        return fresh(fn(*a), list(_tensors(a)))

    def forward_fake(*args, **kwargs):
        a = bind(*args, **kwargs)
        spec.check(*a)
        return spec.fake(*a)

    schema = torch.library.infer_schema(spec.signature, mutates_args=())
    op = torch.library.custom_op(f"dip::{spec.name}", _with_signature(forward_impl, sig, spec.name),
                                 mutates_args=(), schema=schema)
    op.register_fake(_with_signature(forward_fake, sig, spec.name))
    SPECS[spec.name] = spec

    if spec.autograd is not None:
        setup, backward = spec.autograd
        op.register_autograd(backward, setup_context=setup)
    elif spec.backward is not None:
        _define_backward(spec, op, sig, names)
    return op


def _define_backward(spec, op, sig, names):
    bw = spec.backward
    bsig = _backward_signature(spec, sig)
    bind = _binder(bsig)
    bname = f"{spec.name}_backward"
    grad_outputs = bw.grad_outputs or spec.outputs
    n_grads = len(grad_outputs)
    dispatch_names = names[:spec.dispatch]
    missing = [n for n in dispatch_names if n not in bw.saves]
    assert not missing, f"{spec.name}: the backward must receive the inputs the backend is chosen from ({missing})"
    dispatch_at = [n_grads + bw.saves.index(n) for n in dispatch_names]

    def backward_impl(*args, **kwargs):
        a = bind(*args, **kwargs)
        fn = backends.implementation(bname, *(a[i] for i in dispatch_at))
        return fresh(fn(*a), list(_tensors(a)))

    def backward_fake(*args, **kwargs):
        a = bind(*args, **kwargs)
        grads = [_contiguous_like(a[n_grads + bw.saves.index(g)]) for g in bw.grads]
        return grads[0] if len(grads) == 1 else tuple(grads)

    schema = torch.library.infer_schema(_with_signature(lambda *a: None, bsig, bname), mutates_args=())
    bop = torch.library.custom_op(f"dip::{bname}", _with_signature(backward_impl, bsig, bname),
                                  mutates_args=(), schema=schema)
    bop.register_fake(_with_signature(backward_fake, bsig, bname))

    position = {n: i for i, n in enumerate(names)}
    out_position = {n: i for i, n in enumerate(spec.outputs)}
    for name in bw.saves:
        assert name in position or name in out_position, f"{spec.name}: cannot save {name!r}"

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        flat, layout = [], []
        for name in bw.saves:
            value = inputs[position[name]] if name in position else outputs[out_position[name]]
            if isinstance(value, (list, tuple)):
                layout.append(len(value))
                flat.extend(value)
            else:
                layout.append(None)
                flat.append(value)
        ctx.save_for_backward(*flat)
        ctx.layout = layout
        ctx.attrs = tuple(inputs[position[name]] for name in bw.attrs)
        no_grad = [outputs[out_position[o]] for o in spec.outputs if o not in grad_outputs]
        if no_grad:
            ctx.mark_non_differentiable(*no_grad)

    def backward(ctx, *grads):
        used = [g.contiguous() for o, g in zip(spec.outputs, grads) if o in grad_outputs]
        saved, it = [], iter(ctx.saved_tensors)
        for n in ctx.layout:
            saved.append(next(it) if n is None else [next(it) for _ in range(n)])
        result = getattr(torch.ops.dip, bname)(*used, *saved, *ctx.attrs)
        result = (result,) if len(bw.grads) == 1 else result
        out = [None] * len(names)
        for name, g in zip(bw.grads, result):
            out[position[name]] = list(g) if isinstance(g, (list, tuple)) else g
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)


# ---------------------------------------------------------------- the public functions' switch
_plain = False


@contextlib.contextmanager
def plain_reference(enabled: bool = True):
    """Inside this block the public functions (dip_kernels.attention, ...) call the reference
    functions directly, with plain autograd and no custom ops: the model becomes exactly what a user
    without this library would run (and what torch.compile of it would see). The benchmarks'
    ``reference`` and ``compile`` baselines; not a backend, since it bypasses the ops' checks, schema and saved
    statistics."""
    global _plain
    old, _plain = _plain, enabled
    try:
        yield
    finally:
        _plain = old


def plain():
    """Whether the public functions run the plain reference (see plain_reference)."""
    return _plain


__all__ = ["Backward", "OpSpec", "define", "fresh", "plain_reference", "plain", "SPECS"]
