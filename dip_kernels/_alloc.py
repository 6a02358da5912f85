"""Allocation of backend outputs, and the switch that poisons every allocation under test.

Backends allocate each output with ``output_buffer`` (uninitialised: a kernel writes every element;
contiguous; never a view of an input) and their intermediates with ``torch.empty``. Inside
``poisoned_allocations()`` all of those start as NaN (floating) or the dtype's maximum (integer),
through torch's deterministic fill of uninitialised memory, so an element a kernel forgets to write
fails a comparison instead of passing on stale, right-looking values. It lives here, not in
dip_kernels.testing, because it is the allocation contract of the kernels themselves.
"""
import contextlib

import torch


def output_buffer(shape, dtype, device):
    """A backend's output (uninitialised: a kernel writes every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every uninitialised allocation made in this block with NaN / the integer maximum.
    (Deterministic mode is on with warn_only inside, so an op without a deterministic
    implementation warns instead of raising.)"""
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.utils.deterministic.fill_uninitialized_memory = old[2]
