"""The implementations each benchmark compares ("providers").

Op level:
  reference     the reference function in dip_kernels/reference, called directly under torch
                autograd: what a user without this library would run (no lse, no recompute-based
                backward)
  compile       torch.compile of that same reference function (dynamic=False: one static graph per shape)
  op_reference  the torch.ops.dip op on its "reference" backend: the reference math behind the
                custom-op layer; its attention forward also computes the lse (an explicit fp32
                QK^T) and every reference-backend backward recomputes the forward, so it shows what
                the op layer costs
  triton        the torch.ops.dip op with set_backend("triton", op)
  cuda          the torch.ops.dip op with set_backend("cuda", op)
  onednn        the torch.ops.dip op with set_backend("onednn", op) (CPU tensors; the detailer suite only)

Model level (DiP):
  reference     dip_kernels.plain_reference(): the model calls the reference functions directly, no
                custom ops, plain autograd -- the plain PyTorch DiP a user would otherwise run
  compile       torch.compile(model, dynamic=False) inside plain_reference(): the compiler sees (and
                fuses) every reference op
  dip           the custom ops on backend "auto" (cuda, then triton, then the reference)

DIP_BENCH_PROVIDERS=reference,triton (comma list) restricts any suite to those providers;
DIP_BENCH_COMPILE_BACKEND picks torch.compile's backend (default inductor on GPU, aot_eager on CPU).
"""
import contextlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch

import dip_kernels
from dip_kernels import backends

OP_PROVIDERS = ("reference", "compile", "triton", "cuda")
MODEL_PROVIDERS = ("reference", "compile", "dip")


def _configure_dynamo():
    # every suite compiles one function at several shapes and grad modes; the default recompile
    # limit (8) would silently fall back to eager past it
    import torch._dynamo.config as dynamo_config
    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64),
                        ("accumulated_cache_size_limit", 512), ("accumulated_recompile_limit", 512)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))


_configure_dynamo()


def requested(provider: str) -> bool:
    wanted = os.environ.get("DIP_BENCH_PROVIDERS", "").strip()
    return not wanted or provider in {p.strip() for p in wanted.split(",")}


def compile_backend() -> str:
    """torch.compile's backend: $DIP_BENCH_COMPILE_BACKEND, else inductor on GPU. On the CPU the
    default is aot_eager (the same tracing and autograd graphs, no C++ code generation): the CPU
    run only proves the suites work, and inductor's C++ builds would take minutes on two cores."""
    chosen = os.environ.get("DIP_BENCH_COMPILE_BACKEND", "").strip()
    if chosen:
        return chosen
    from bench import timing
    return "inductor" if timing.on_gpu() else "aot_eager"


def unavailable_reason(op: str, provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run ``op`` on ``device`` (None when it can)."""
    if not requested(provider):
        return f"provider {provider!r} not in DIP_BENCH_PROVIDERS"
    if provider in ("reference", "compile", "op_reference"):
        return None
    if provider in ("triton", "cuda", "onednn"):
        if provider in dip_kernels.available_backends(op, device):
            return None
        return backends.why_unavailable(op, provider, device) or "unavailable"
    return f"unknown provider {provider!r}"


@contextlib.contextmanager
def op_backend(op: Optional[str], name: Optional[str]):
    """Select backend ``name`` for ``op`` (every op when op is None) for the block; restores the
    previous choices afterwards. name None: change nothing."""
    saved = {o: dip_kernels.get_backend(o) for o in dip_kernels.OPS}
    try:
        if name is not None:
            dip_kernels.set_backend(name, op=op)
        yield
    finally:
        for o, previous in saved.items():
            dip_kernels.set_backend(previous, op=o)


_compiled: Dict[Tuple[int, str], Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) once per function, static shapes (a new graph per shape, never a dynamic one
    that would time differently)."""
    key = (id(fn), compile_backend())
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False, backend=compile_backend())
    return _compiled[key]


def op_implementation(provider: str, op: str, reference_fn: Callable, dip_fn: Callable):
    """(callable, backend context) for an op-level provider."""
    if provider == "reference":
        return reference_fn, op_backend(None, None)
    if provider == "compile":
        return compiled(reference_fn), op_backend(None, None)
    if provider == "op_reference":
        return dip_fn, op_backend(op, "reference")
    if provider in ("triton", "cuda", "onednn"):
        return dip_fn, op_backend(op, provider)
    raise ValueError(f"unknown provider {provider!r}")


def model_backend(provider: str):
    """The backend context for a model-level provider (every op at once)."""
    if provider in ("reference", "compile"):
        return dip_kernels.plain_reference()
    if provider == "dip":
        return op_backend(None, "auto")
    raise ValueError(f"unknown model provider {provider!r}")


def resolved_backends(device: torch.device) -> Dict[str, str]:
    """Which backend actually runs each op right now on ``device`` (for extra_info)."""
    out = {}
    for op in dip_kernels.OPS:
        try:
            out[op] = backends.resolve(op, device)
        except Exception as e:  # unavailable choice: say so instead of failing the record
            out[op] = f"unavailable: {e}"
    return out
