"""Helpers that keep kernel tests honest: poisoned allocations (dip_kernels._alloc), the backend
that ran, and fp64-anchored tolerances.

Inside ``poisoned_allocations()`` every new tensor of uninitialised memory (``torch.empty`` and
its relatives: kernel outputs, the wrappers' intermediates, blocks the caching allocator hands back
still holding earlier results) starts as NaN (floating) or the dtype's maximum (integer). An
element a kernel forgets to write then fails the comparison instead of passing on stale values.
"""
import contextlib

import torch

from . import backends
from ._alloc import poisoned_allocations  # noqa: F401  (re-exported: the tests' entry point)


@contextlib.contextmanager
def ran_on(backend):
    """Assert that dip ops ran inside the block and every one of them ran on ``backend`` (as
    dip_kernels.backends recorded it: no fallback goes unseen). Yields the recorded choices."""
    with backends.recorded_runs() as runs:
        yield runs
    wrong = [(c.op, c.backend, c.reason) for c in runs if c.backend != backend]
    assert runs and not wrong, f"expected every dip op on {backend}; ran {[(c.op, c.backend) for c in runs]}: {wrong}"


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


def rms_error(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def assert_close_to_fp64(actual, same_dtype_reference, fp64_reference, name="output", factor=2.0, atol=1e-5,
                         error=max_error):
    """The kernel's error against an fp64 reference must be at most ``factor`` times the
    reference's own error in the same low precision, plus ``atol``: the kernel is judged by the
    rounding its dtype forces, not by an arbitrary tolerance. ``error`` measures it: the largest
    elementwise error by default; ``rms_error`` where the maximum of few elements' rounding errors is
    too noisy a statistic to compare (a wrong element still stands far above rounding in it)."""
    assert actual.shape == fp64_reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(fp64_reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten poisoned elements?)"
    err = error(actual, fp64_reference)
    ref_err = error(same_dtype_reference, fp64_reference)
    bound = factor * ref_err + atol * max(1.0, fp64_reference.abs().max().item())
    assert err <= bound, (f"{name}: {error.__name__} {err:.3e} vs fp64 exceeds {factor} x reference "
                          f"{error.__name__} {ref_err:.3e} + atol")
