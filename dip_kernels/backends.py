"""Which implementation runs behind each ``torch.ops.dip.*`` op: dispatch by capability.

Backends: ``reference`` (dip_kernels/reference, the ground truth: it runs every input),
``triton`` (dip_kernels/triton), ``cuda`` (dip_kernels/cuda over the compiled extension
dip_kernels._C, csrc/) and ``onednn`` (dip_kernels/onednn, the Patch Detailer Head only: CPU
tensors, never picked by auto). The old names ``eager`` (reference) and ``cpu`` (onednn) are
accepted with a DeprecationWarning. Each op's spec (dip_kernels/ops/<op>.py) lists the modules that
implement it, fastest first; each backend module declares in ``CAPABILITY`` what it runs: the
device types, the dtypes of the deciding (first) input, where ``auto`` may pick it, and any other
limits (a function giving the reason it cannot run given inputs).

``auto`` (the default) runs each call on the first backend in the op's order that is available
here and supports the call's inputs; the reference supports everything and comes last, so auto
is the reference on CPU tensors (Triton's CPU interpreter and onednn are never picked by auto)
and cuda, then triton, then the reference on CUDA tensors. A backend chosen by name
(``dip_kernels.set_backend("triton")``, ``set_backend("cuda", op="patch_detailer")``, or
``DIP_KERNELS_BACKEND=triton`` / ``DIP_KERNELS_BACKEND=auto,patch_detailer=cuda`` read at import)
runs every call it supports; a call it does not support runs the reference with a
RuntimeWarning. Nothing falls back inside a backend. The user's choice is the only state kept;
each call's choice is recorded (``recorded_runs()``) and ``dip_kernels.explain(op, *inputs)`` says
what would run and why.
"""
import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "onednn")
REFERENCE = "reference"  # the ground truth: every op has it, last in its order
# old backend names a user may still type: each one runs the backend it names, with a DeprecationWarning
RENAMED = {"eager": "reference", "cpu": "onednn"}
FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_MODULES: Dict[str, Dict[str, str]] = {}  # op family -> backend -> module, fastest first (the op specs')
_FAMILY: Dict[str, str] = {}              # custom op (forward and backward) -> its op family
_choice: Dict[str, str] = {}              # op family -> the backend the user chose ("auto" by default)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class Capability:
    """What a backend module runs (its ``CAPABILITY``)."""
    devices: Optional[Tuple[str, ...]]                       # device types of the tensors it runs (None: any)
    dtypes: Tuple[torch.dtype, ...] = FLOATING               # dtypes of the deciding (first) input
    auto_devices: Optional[Tuple[str, ...]] = None           # where auto may pick it (None: devices; (): nowhere)
    device_hint: str = ""                                    # how to run it on another device
    dtype_reason: Optional[Callable[[torch.dtype], str]] = None  # why a dtype is not in dtypes
    limits: Optional[Callable[..., Optional[str]]] = None    # limits(*inputs): why not, or None

    def declines(self, device_type, inputs=None, auto=False):
        """Why this backend cannot run tensors of ``device_type`` (and, given, these inputs: the
        op's leading inputs), or None."""
        devices = self.auto_devices if auto and self.auto_devices is not None else self.devices
        if devices is not None and device_type not in devices:
            if auto:
                if not devices:
                    return "auto never picks it (it runs when chosen by name)"
                return f"auto picks it for {'/'.join(devices)} tensors, got {device_type}"
            hint = f"; {self.device_hint}" if self.device_hint else ""
            return f"it runs {'/'.join(devices)} tensors, got {device_type}{hint}"
        if inputs is None:
            return None
        first = _first_tensor(inputs)
        if first is not None and first.dtype not in self.dtypes:
            if self.dtype_reason is not None:
                return self.dtype_reason(first.dtype)
            return f"it runs {', '.join(str(d).replace('torch.', '') for d in self.dtypes)}, got {first.dtype}"
        return self.limits(*inputs) if self.limits is not None else None


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capturing(t):
    """Whether work on ``t``'s device is being captured into a CUDA graph right now (caches of
    weight re-layouts are bypassed then; see dip_kernels.plan.patch_detailer.WeightCache)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------- the op families and their backends
def register(op, family, modules):
    """Called by dip_kernels.opspec.define for custom op ``op`` (and its backward op) of op family
    ``family``: ``modules`` maps backend -> module, fastest first."""
    _FAMILY[op] = _FAMILY[f"{op}_backward"] = family
    if family in _MODULES:
        assert _MODULES[family] == dict(modules), f"{family}: two specs disagree on its backends"
        return
    assert list(modules)[-1] == REFERENCE, f"{family}: the reference must come last"
    _MODULES[family] = dict(modules)
    _choice.setdefault(family, "auto")


def ops():
    """The op families, in definition order (what set_backend's ``op`` takes)."""
    return tuple(_MODULES)


def op_family(op):
    """The op family (the key of the user's choice) of custom op ``op``, e.g. attention_backward ->
    attention, unpatchify -> patchify."""
    return _FAMILY.get(op, op)


def has_backend(op, backend):
    return backend in _MODULES[op_family(op)]


def set_backend(name, op=None):
    """Select backend ``name`` for ``op``; with ``op=None``, for every op that has that backend.
    Raises BackendUnavailableError, saying what is missing, if it cannot run here at all."""
    name = _current_name(name)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if op is None:
        # every op that has this backend; the others keep their choice
        families = tuple(o for o in _MODULES if name in ("auto", REFERENCE) or name in _MODULES[o])
    elif op not in _MODULES:
        raise ValueError(f"op must be one of {ops()}, got {op!r}")
    else:
        families = (op,)
    for o in families:
        if name != "auto":
            problem = _unavailable_reason(o, name)
            if problem:
                raise BackendUnavailableError(f"backend {name!r} for op {o!r} is unavailable: {problem}")
    for o in families:
        _choice[o] = name


def _current_name(name):
    """``name``, or the backend an old name now names (with a DeprecationWarning)."""
    if name in RENAMED:
        warnings.warn(f"dip_kernels: backend {name!r} is now called {RENAMED[name]!r}; the old name will go",
                      DeprecationWarning, stacklevel=3)
        return RENAMED[name]
    return name


def get_backend(op):
    """The backend selected for ``op`` (possibly ``auto``)."""
    return _choice[op]


def available_backends(op, device="cuda"):
    """Backends that can run ``op`` on tensors of ``device`` (whatever their dtype and shape), in
    auto's order."""
    return [b for b in _MODULES[op] if not why_unavailable(op, b, device)]


def why_unavailable(op, backend, device):
    """Why ``backend`` cannot run ``op`` on tensors of ``device`` at all here (not built, not
    importable, another device), or None."""
    return _unavailable_reason(op, backend) or _capability(op, backend).declines(torch.device(device).type)


def apply_environment():
    """The choice in DIP_KERNELS_BACKEND (dip_kernels/__init__ calls it once every op is defined)."""
    for item in filter(None, (s.strip() for s in os.environ.get("DIP_KERNELS_BACKEND", "").split(","))):
        op, _, name = item.rpartition("=")
        set_backend(name, op=op or None)


# ---------------------------------------------------------------- availability (the install)
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
        if importlib.util.find_spec(f"{__package__}._C") is not None:  # built, but not loadable in this torch
            return False, False, (f"the compiled extension dip_kernels._C does not load in torch {torch.__version__} "
                                  f"({e}); install a torch that dip-kernels supports or rebuild it against this one")
        return False, False, (f"the compiled extension dip_kernels._C is not built ({e}); reinstall with "
                              "`pip install --no-build-isolation -e .` on a machine with nvcc and CUDA_HOME set")
    has_cuda = bool(torch.ops.dip_C.built_with_cuda())
    reason = None if has_cuda else ("dip_kernels._C was built without CUDA sources (no nvcc or CUDA_HOME at "
                                    "build time, or DIP_KERNELS_BUILD_CUDA=0); rebuild it with CUDA")
    return True, has_cuda, reason


def warn_once_if_extension_missing():
    loaded, _, reason = _extension_status()
    if not loaded and (torch.cuda.is_available() or importlib.util.find_spec(f"{__package__}._C") is not None):
        warnings.warn(f"dip_kernels: {reason}. The eager and triton backends still work.", stacklevel=2)


def _unavailable_reason(op, backend):
    """Why ``backend`` cannot run ``op`` here at all (not built, not importable), or None."""
    modules = _MODULES[op_family(op)]
    if backend not in modules:
        return f"op {op!r} has no {backend} implementation (it has: {', '.join(modules)})"
    if backend == REFERENCE:
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
    if backend == "cuda":
        _, has_cuda, reason = _extension_status()
        if not has_cuda:
            return reason
    try:
        _module(op_family(op), backend)
    except ImportError as e:
        return f"{modules[backend]} cannot be imported ({e})"
    return None


@functools.lru_cache(None)
def _module(family, backend):
    return importlib.import_module(_MODULES[family][backend])


_RUNS_EVERYTHING = Capability(devices=None)  # the reference's


def _capability(op, backend):
    if backend == REFERENCE:
        return _RUNS_EVERYTHING
    return _module(op_family(op), backend).CAPABILITY


def backend_function(op, backend):
    """The backend module function behind custom op ``op``: ``<op>`` for a backward op, else ``<op>_forward``."""
    return getattr(_module(op_family(op), backend), op if op.endswith("_backward") else f"{op}_forward")


def declines(op, backend, inputs, device_type=None):
    """Why ``backend`` cannot run ``op`` on ``inputs`` (the forward op's leading inputs), or None;
    ``device_type`` judges them as tensors of that device (dip_kernels.precompile: meta tensors
    standing for CUDA ones)."""
    return _capability(op, backend).declines(device_type or _device_of(inputs).type, inputs)


# ---------------------------------------------------------------- the choice, per call
@dataclass(frozen=True)
class Choice:
    op: str       # the custom op, e.g. "attention_backward"
    backend: str  # the implementation that runs it: reference, triton, cuda or onednn
    reason: str   # why that one


def _first_tensor(inputs):
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t
        if isinstance(t, (list, tuple)) and t and isinstance(t[0], torch.Tensor):
            return t[0]
    return None


def _device_of(inputs):
    t = _first_tensor(inputs)
    if t is None:
        raise ValueError("an op needs at least one tensor input")
    return t.device


def resolve(op, device):
    """The backend that runs ``op`` for tensors on ``device`` whatever their dtype and shape (see
    choose for given inputs); raises if the chosen one cannot run here."""
    return _select(op, torch.device(device), None).backend


def choose(op, inputs):
    """The implementation that runs custom op ``op`` on ``inputs`` (the forward op's leading inputs:
    for a backward op, the forward's inputs, not the gradient), and why. Raises
    BackendUnavailableError if the backend chosen by name cannot run here at all."""
    return _select(op, _device_of(inputs), inputs)


def _select(op, device, inputs):
    family = op_family(op)
    name = _choice[family]
    if name == "auto":
        passed = []
        for b in _MODULES[family]:
            problem = _unavailable_reason(family, b) or _capability(family, b).declines(device.type, inputs, auto=True)
            if not problem:
                return Choice(op, b, "; ".join([f"auto on {device.type} tensors"] + passed + [f"{b} runs them"]))
            passed.append(f"not {b}: {problem}")
    problem = _unavailable_reason(family, name) or _capability(family, name).declines(device.type)
    if problem:
        raise BackendUnavailableError(f"backend {name!r} for op {family!r} is unavailable: {problem}")
    problem = _capability(family, name).declines(device.type, inputs) if inputs is not None else None
    if problem:
        return Choice(op, REFERENCE, f"{name} selected, but it cannot run these inputs: {problem}")
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
    """The backend function that runs custom op ``op`` on ``inputs`` (see choose); records the
    choice, and warns when a backend selected by name cannot run these inputs and the reference
    runs them."""
    choice = choose(op, inputs)
    if _runs is not None:
        _runs.append(choice)
    if choice.backend != _choice[op_family(op)] != "auto":
        # once per message, by the default warning filter
        warnings.warn(f"dip_kernels: {choice.reason}; the reference runs {op}", RuntimeWarning, stacklevel=3)
    return backend_function(op, choice.backend)


def explain(op, *inputs):
    """Which implementation runs ``op`` (e.g. "attention" or "patch_detailer_backward") on these
    inputs, and why, as one line."""
    choice = choose(op, inputs)
    return f"dip.{choice.op}: {choice.backend} ({choice.reason})"
