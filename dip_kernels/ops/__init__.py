"""The ``torch.ops.dip.*`` custom ops, one file per op (family): its spec (dip_kernels.opspec:
signature, input check, fake, backends, derivative) and the public function the model calls."""
from ..opspec import plain_reference
from .attention import attention
from .elementwise import gated_residual, rmsnorm_modulate, swiglu
from .patch_detailer import autocast_dtype, patch_detailer
from .patchify import patchify, unpatchify

__all__ = ["attention", "gated_residual", "patch_detailer", "patchify", "plain_reference", "rmsnorm_modulate",
           "swiglu", "unpatchify", "autocast_dtype"]
