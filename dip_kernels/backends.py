"""Which implementation runs behind each ``torch.ops.dip.*`` op.

Backends: ``eager`` (the reference ops in dip_kernels/reference), ``triton`` (dip_kernels/triton),
``cuda`` (csrc/, the compiled extension dip_kernels._C), and ``auto``: the best one available for
the tensors' device (cuda, then triton, then eager on a GPU; eager on a CPU).

Choose with ``dip_kernels.set_backend("triton")`` (every op) or ``set_backend("cuda",
op="patch_detailer")``, or with the environment variable read at import:
``DIP_KERNELS_BACKEND=triton`` or ``DIP_KERNELS_BACKEND=auto,patch_detailer=cuda``.
"""
import functools
import importlib
import os
import warnings

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
    """The backend that runs ``op`` for tensors on ``device``; raises if the chosen one cannot."""
    device = torch.device(device)
    name = _choice[op]
    if name == "auto":
        if device.type != "cuda":
            return "eager"
        for b in _AUTO_ORDER:
            if not _unavailable_reason(op, b, device):
                return b
    problem = _unavailable_reason(op, name, device)
    if problem:
        raise BackendUnavailableError(f"backend {name!r} for op {op!r} is unavailable: {problem}")
    return name


def implementation(op, device):
    """The module holding the chosen backend's functions for ``op`` on ``device``."""
    return _module(op, resolve(op, device))


_parse_env(os.environ.get("DIP_KERNELS_BACKEND", ""))
