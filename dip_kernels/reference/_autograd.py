import contextlib

import torch


@contextlib.contextmanager
def _autograd_dispatch():
    # Custom-op implementations run below the Autograd dispatch key (autograd excluded in TLS), so
    # torch.enable_grad() alone records nothing; lift that exclusion for the recompute.
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def grads_by_recompute(fn, inputs, grad_out):
    """Gradients of ``fn(*inputs)`` w.r.t. every floating tensor in ``inputs`` (a flat list), by
    recomputing the reference forward under autograd: the reference backward saves nothing."""
    with _autograd_dispatch():
        leaves = [t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in inputs]
        out = fn(*leaves)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
    it = iter(grads)
    result = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g)
        else:
            result.append(None)
    return result
