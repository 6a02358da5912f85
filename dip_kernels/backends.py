"""Which implementation runs behind each ``torch.ops.dip.*`` op.

Backends: ``eager`` (the reference ops in dip_kernels/reference), ``triton`` (dip_kernels/triton),
``cuda`` (csrc/, the compiled extension dip_kernels._C), and ``auto``: the best one available for
the tensors' device (cuda, then triton, then eager on a GPU; eager on a CPU).

Choose with ``dip_kernels.set_backend("triton")`` (every op) or ``set_backend("cuda",
op="patch_detailer")``, or with the environment variable read at import:
``DIP_KERNELS_BACKEND=triton`` or ``DIP_KERNELS_BACKEND=auto,patch_detailer=cuda``.

A backend module may decline inputs it cannot run (``unsupported(*inputs)`` returns the reason,
e.g. the CUDA head's tensor-core kernels and float32): ``auto`` then takes the next backend, and a
backend chosen by name that declines runs the eager reference with a warning. Either way the choice
is recorded: ``dip_kernels.explain(op, *inputs)`` says what would run and why, and
``recorded_runs()`` lists what did.
"""
import contextlib
import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "eager", "triton", "cuda")

# op -> backend -> module implementing ``<op>_forward`` / ``<op>_backward`` (patchify: patchify/unpatchify)
_MODULES = {
    "patchify": {"eager": "dip_kernels.reference.patchify", "triton": "dip_kernels.triton.patchify"},
    "attention": {"eager": "dip_kernels.reference.attention", "triton": "dip_kernels.triton.attention"},
    "patch_detailer": {"eager": "dip_kernels.reference.patch_detailer",
                       "triton": "dip_kernels.triton.patch_detailer",
                       "cuda": "dip_kernels.cuda.patch_detailer"},
    "rmsnorm_modulate": {"eager": "dip_kernels.reference.elementwise", "triton": "dip_kernels.triton.elementwise"},
    "gated_residual": {"eager": "dip_kernels.reference.elementwise", "triton": "dip_kernels.triton.elementwise"},
    "swiglu": {"eager": "dip_kernels.reference.elementwise", "triton": "dip_kernels.triton.elementwise"},
}
OPS = tuple(_MODULES)
_AUTO_ORDER = ("cuda", "triton", "eager")

_choice = {op: "auto" for op in OPS}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says what is missing."""


def _parse_env(value):
    for item in filter(None, (s.strip() for s in value.split(","))):
        op, _, name = item.rpartition("=")
        set_backend(name, op=op or None)


def set_backend(name, op=None):
    """Select backend ``name`` for ``op``; with ``op=None``, for every op that has that backend.
    Raises BackendUnavailableError, saying what is missing, if it cannot run here at all."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if op is None:
        # every op that has this backend; the others keep their choice
        ops = tuple(o for o in OPS if name in ("auto", "eager") or name in _MODULES[o])
    elif op not in _MODULES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    else:
        ops = (op,)
    for o in ops:
        if name != "auto":
            problem = _unavailable_reason(o, name)
            if problem:
                raise BackendUnavailableError(f"backend {name!r} for op {o!r} is unavailable: {problem}")
    for o in ops:
        _choice[o] = name


def get_backend(op):
    """The backend selected for ``op`` (possibly ``auto``)."""
    return _choice[op]


def available_backends(op, device="cuda"):
    """Backends that can run ``op`` on tensors of ``device``."""
    device = torch.device(device)
    return [b for b in _AUTO_ORDER if not _unavailable_reason(op, b, device)]


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capturing(t):
    """Whether work on ``t``'s device is being captured into a CUDA graph right now. Weight caches
    are bypassed then: a graph must re-lay the weights it replays with, or its replays would read
    a cache entry's memory, stale after an in-place optimizer step and freed once evicted."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(None)
def _triton_import_error():
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({e}); pip install triton"
    return None


@functools.lru_cache(None)
def _extension_status():
    """(loaded, has_cuda, reason) for the compiled extension dip_kernels._C."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return False, False, (f"the compiled extension dip_kernels._C is not built ({e}); reinstall with "
                              "`pip install --no-build-isolation -e .` on a machine with nvcc and CUDA_HOME set")
    has_cuda = bool(torch.ops.dip_C.built_with_cuda())
    reason = None if has_cuda else ("dip_kernels._C was built without CUDA sources (no nvcc or CUDA_HOME at "
                                    "build time, or DIP_KERNELS_BUILD_CUDA=0); rebuild it with CUDA")
    return True, has_cuda, reason


def warn_once_if_extension_missing():
    loaded, _, reason = _extension_status()
    if not loaded and torch.cuda.is_available():
        warnings.warn(f"dip_kernels: {reason}. The eager and triton backends still work.", stacklevel=2)


def _unavailable_reason(op, backend, device=None):
    modules = _MODULES[op]
    if backend == "eager":
        return None
    if backend not in modules:
        return f"op {op!r} has no {backend} implementation (it has: {', '.join(modules)})"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device is not None and device.type != "cuda" and not triton_interpreted():
            return f"triton kernels run on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run them on CPU"
    if backend == "cuda":
        _, has_cuda, reason = _extension_status()
        if not has_cuda:
            return reason
        if device is not None and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
    try:
        _module(op, backend)
    except ImportError as e:
        return f"{modules[backend]} cannot be imported ({e})"
    return None


@functools.lru_cache(None)
def _module(op, backend):
    return importlib.import_module(_MODULES[op][backend])


def resolve(op, device):
    """The backend that runs ``op`` for tensors on ``device`` whatever their dtype and shape (see
    choose for given inputs); raises if the chosen one cannot run here."""
    return _select(op, op_family(op), torch.device(device), None).backend


def op_family(op):
    """The op whose backend runs custom op ``op``: attention_backward -> attention, unpatchify -> patchify."""
    family = op[:-len("_backward")] if op.endswith("_backward") else op
    return "patchify" if family == "unpatchify" else family


def backend_function(op, backend):
    """The backend module function behind custom op ``op``: ``<op>`` for a backward op, else ``<op>_forward``."""
    return getattr(_module(op_family(op), backend), op if op.endswith("_backward") else f"{op}_forward")


def declines(op, backend, inputs):
    """Why ``backend`` cannot run ``op`` on ``inputs`` (the forward op's leading inputs), or None."""
    check = getattr(_module(op_family(op), backend), "unsupported", None)
    return check(*inputs) if check is not None else None


@dataclass(frozen=True)
class Choice:
    op: str       # the custom op, e.g. "attention_backward"
    backend: str  # the implementation that runs it: eager, triton or cuda
    reason: str   # why that one


def _device_of(inputs):
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
        if isinstance(t, (list, tuple)) and t and isinstance(t[0], torch.Tensor):
            return t[0].device
    raise ValueError("an op needs at least one tensor input")


def choose(op, inputs):
    """The implementation that runs custom op ``op`` on ``inputs`` (the forward op's leading inputs:
    for a backward op, the forward's inputs, not the gradient), and why. Raises
    BackendUnavailableError if the backend chosen by name cannot run here at all."""
    return _select(op, op_family(op), _device_of(inputs), inputs)


def _select(op, family, device, inputs):
    check = (lambda b: declines(op, b, inputs)) if inputs is not None else (lambda b: None)
    name = _choice[family]
    if name == "auto":
        if device.type != "cuda":
            return Choice(op, "eager", f"auto on {device.type} tensors runs the eager reference")
        passed = []
        for b in _AUTO_ORDER:
            problem = _unavailable_reason(family, b, device) or check(b)
            if not problem:
                return Choice(op, b, "; ".join(["auto on cuda tensors"] + passed + [f"{b} runs them"]))
            passed.append(f"not {b}: {problem}")
    problem = _unavailable_reason(family, name, device)
    if problem:
        raise BackendUnavailableError(f"backend {name!r} for op {family!r} is unavailable: {problem}")
    problem = check(name)
    if problem:
        return Choice(op, "eager", f"{name} selected, but it cannot run these inputs: {problem}")
    return Choice(op, name, f"{name} selected")


_runs = None  # a list while recorded_runs() is active


@contextlib.contextmanager
def recorded_runs():
    """Every custom-op call in this block appends the Choice that ran it to the yielded list."""
    global _runs
    outer, _runs = _runs, []
    try:
        yield _runs
    finally:
        _runs = outer


def implementation(op, *inputs):
    """The backend module that runs custom op ``op`` on ``inputs`` (see choose); records the choice,
    and warns when a backend selected by name cannot run these inputs and the reference runs them."""
    choice = choose(op, inputs)
    if _runs is not None:
        _runs.append(choice)
    if choice.backend != _choice[op_family(op)] != "auto":
        # once per message, by the default warning filter
        warnings.warn(f"dip_kernels: {choice.reason}; the eager reference runs {op}", RuntimeWarning, stacklevel=3)
    return _module(op_family(op), choice.backend)


def explain(op, *inputs):
    """Which implementation runs ``op`` (e.g. "attention" or "patch_detailer_backward") on these
    inputs, and why, as one line."""
    choice = choose(op, inputs)
    return f"dip.{choice.op}: {choice.backend} ({choice.reason})"


_parse_env(os.environ.get("DIP_KERNELS_BACKEND", ""))
