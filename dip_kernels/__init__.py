"""dip-kernels: custom ops (``torch.ops.dip.*``) for DiP, with reference, Triton, CUDA and oneDNN backends."""
from . import backends
from .backends import available_backends, explain, get_backend, set_backend, BackendUnavailableError, BACKENDS
from .ops import (attention, gated_residual, patch_detailer, patchify, plain_reference, rmsnorm_modulate, swiglu,
                  unpatchify)
from .reference.attention import rope_table
from .reference.patch_detailer import DETAILER_WEIGHT_NAMES


__version__ = "0.1.0"
OPS = backends.ops()  # the op families set_backend takes, now that every op is defined
backends.apply_environment()
backends.warn_once_if_extension_missing()

__all__ = [
    "attention", "gated_residual", "patch_detailer", "patchify", "rmsnorm_modulate", "swiglu", "unpatchify",
    "rope_table", "DETAILER_WEIGHT_NAMES", "plain_reference", "set_backend", "get_backend",
    "available_backends", "explain",
    "BackendUnavailableError", "BACKENDS", "OPS",
]
