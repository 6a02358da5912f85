"""A guard for the samplers' promise that no step reads a tensor's value back to the host.

On a GPU such a read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``,
...) waits for every queued kernel; ``torch.cuda.set_sync_debug_mode("error")`` catches it there. On
the CPU nothing waits, so :func:`no_host_reads` is a TorchFunctionMode that fails on the Python-level
calls that read a value back. It sees every such call made from Python (the samplers, the model's
modules), not a read made inside a C++ kernel, which the GPU check covers.
"""
import contextlib

from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions whose result needs the tensor's values on the host
HOST_READS = frozenset({
    "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__", "__array__", "__repr__",
    "item", "tolist", "cpu", "numpy", "equal", "allclose", "is_nonzero", "nonzero", "masked_select",
    "unique", "unique_consecutive",
})


class HostReadError(AssertionError):
    pass


class _NoHostReads(TorchFunctionMode):
    def __init__(self, allow):
        super().__init__()
        self.allow = {id(t) for t in allow}
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not (args and id(args[0]) in self.allow):
            raise HostReadError(f"a tensor was read back to the host: {name}")
        self.calls += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(allow=()):
    """Fails (HostReadError) on any host read of a tensor inside the block, except of the tensors in
    ``allow`` (host-side by construction, e.g. a noise schedule's table); yields the guard, whose
    ``calls`` counts the torch calls it let through (so a test can check that it saw the work)."""
    guard = _NoHostReads(allow)
    with guard:
        yield guard
