"""Triton backends of the dip ops, one module per op family (functions as in dip_kernels/reference)."""
from ..backends import Capability, triton_interpreted


def capability(interpreted=None, **kwargs):
    """A Triton module's CAPABILITY: CUDA tensors, and CPU tensors through Triton's interpreter when
    TRITON_INTERPRET=1 (then only when chosen by name: auto never picks the interpreter).
    ``interpreted`` (default: as this process runs Triton) lets a test ask what a GPU process declares."""
    interpreted = triton_interpreted() if interpreted is None else interpreted
    return Capability(devices=("cuda", "cpu") if interpreted else ("cuda",), auto_devices=("cuda",),
                      device_hint="set TRITON_INTERPRET=1 to run them on CPU", **kwargs)


__all__ = ["capability", "triton_interpreted"]
