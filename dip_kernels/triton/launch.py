"""The one way the Triton wrappers launch a kernel: ``launch(kernel, grid, *args, **meta)``.

Normally that is ``kernel[grid](*args, **meta)``. Inside ``recording()`` nothing runs: each launch
is appended to a list instead (the kernel, its grid and its arguments). dip_kernels.precompile runs
the wrappers' own host code on meta tensors this way, so the kernels and specialisations it
compiles ahead of time are derived from the code that launches them, not from a second list.

A callable grid (autotuned kernels) is evaluated for every autotune config while recording, as the
autotuner itself does when it benchmarks them; wrappers may read what the grid function computed.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import triton


@dataclass
class Launch:
    kernel: Any            # a JITFunction, or triton.autotune / triton.heuristics around one
    args: tuple            # positional kernel arguments (tensors, ints, floats)
    meta: Dict[str, Any]   # keyword arguments: constexprs and launch options (num_warps, ...)
    grids: List[tuple] = field(default_factory=list)  # one grid per autotune config, else one


_recorded: Optional[List[Launch]] = None


def autotune_configs(kernel):
    """The configs an autotuned kernel may pick (empty for a kernel that is not autotuned)."""
    return list(kernel.configs) if isinstance(kernel, triton.runtime.Autotuner) else []


def jit_function(kernel):
    """The JITFunction under any autotune / heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _grids(kernel, grid, args, meta):
    if not callable(grid):
        return [tuple(grid)]
    named = dict(zip(jit_function(kernel).arg_names, args), **meta)
    return [tuple(grid({**named, **cfg.all_kwargs()})) for cfg in autotune_configs(kernel)] or [tuple(grid(named))]


def launch(kernel, grid, *args, **meta):
    if _recorded is not None:
        _recorded.append(Launch(kernel, args, meta, _grids(kernel, grid, args, meta)))
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording():
    """Record every launch made in this block (in a list it yields) instead of running it."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer
