"""Helpers that keep kernel tests honest: poisoned output buffers and fp64-anchored tolerances.

Kernel wrappers allocate their outputs with ``output_buffer``; inside ``poisoned_outputs()`` those
buffers start as NaN (floating) or -1 (integer), so an element a kernel forgets to write fails.
"""
import contextlib

import torch

_poison = False


def output_buffer(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@contextlib.contextmanager
def poisoned_outputs():
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_fp64(actual, same_dtype_reference, fp64_reference, name="output", factor=2.0, atol=1e-5):
    """The kernel's error against an fp64 reference must be at most ``factor`` times the eager
    reference's own error in the same low precision, plus ``atol``: the kernel is judged by the
    rounding its dtype forces, not by an arbitrary tolerance."""
    assert actual.shape == fp64_reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(fp64_reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten poisoned elements?)"
    err = max_error(actual, fp64_reference)
    ref_err = max_error(same_dtype_reference, fp64_reference)
    bound = factor * ref_err + atol * max(1.0, fp64_reference.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} vs fp64 exceeds {factor} x eager error {ref_err:.3e} + atol"
