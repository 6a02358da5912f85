"""Shared helpers for the suites: parameter ids the report groups by, the extra_info record, random
inputs.

Every benchmark id reads ``test_<suite>[<mode>-<dtype>-<case>-<provider>]`` and the same fields
are in extra_info (suite, op, mode, dtype, case, provider), so the report never parses ids.
Modes: ``fwd`` (no autograd graph), ``fwdbwd`` (forward + torch.autograd.grad of a random output
gradient w.r.t. the trainable inputs), ``train`` (a whole optimizer step), ``sample``.
Bytes are the fewest a call must move: every input read once, every output written once.
"""
import math
from typing import Dict, Optional, Sequence

import pytest
import torch

from bench import providers, timing

ON_GPU = timing.on_gpu()

DTYPE_LABEL = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def param(mode: str, dtype: str, case: str, provider: str, slow: bool = False):
    marks = [pytest.mark.gpu] if ON_GPU else []
    if slow:
        marks.append(pytest.mark.slow)
    return pytest.param(mode, dtype, case, provider, id=f"{mode}-{dtype}-{case}-{provider}", marks=marks)


def grid(cases: Sequence[tuple], provider_names: Sequence[str]):
    """cases: (mode, dtype label, case label[, slow]) tuples, slow either a bool or the providers
    that are slow for that case; one param per case and provider."""
    out = []
    for case in cases:
        mode, dtype, label = case[:3]
        slow = case[3] if len(case) > 3 else False
        for p in provider_names:
            is_slow = (p in slow) if isinstance(slow, (tuple, list, set, frozenset)) else bool(slow)
            out.append(param(mode, dtype, label, p, is_slow))
    return out


def skip_if_unavailable(op: str, provider: str, device: torch.device):
    reason = providers.unavailable_reason(op, provider, device)
    if reason:
        pytest.skip(reason)


def info(suite: str, op: str, mode: str, dtype: str, case: str, provider: str, *, shape: Dict[str, object],
         flops: Optional[float], bytes_moved: Optional[float], **extra) -> Dict[str, object]:
    record = {
        "suite": suite, "op": op, "mode": mode, "dtype": dtype, "case": case, "provider": provider,
        "shape": {k: (list(v) if isinstance(v, tuple) else v) for k, v in shape.items()},
        "flops": flops, "bytes": bytes_moved,
    }
    if provider == "compile":
        record["compile_backend"] = providers.compile_backend()
    record.update(extra)
    return record


def randn(shape, dtype, device, scale=1.0, requires_grad=False):
    t = torch.randn(shape, dtype=torch.float32, device=device).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def tensor_bytes(*shapes_and_dtypes) -> int:
    """Sum of numel * itemsize over (shape, dtype) pairs."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in shapes_and_dtypes)


def grad_fn(fn, n_inputs: int, wrt: Sequence[int]):
    """A callable (*inputs, grad_out) -> gradients of fn(*inputs) w.r.t. inputs[wrt] (flattening
    list arguments), which is what the fwdbwd mode times for every provider alike."""
    def step(*args):
        inputs, grad_out = args[:n_inputs], args[n_inputs]
        out = fn(*inputs)
        targets = []
        for i in wrt:
            targets.extend(inputs[i] if isinstance(inputs[i], (list, tuple)) else [inputs[i]])
        return torch.autograd.grad(out, targets, grad_out)
    return step


def no_grad_fn(fn):
    def call(*args):
        with torch.no_grad():
            return fn(*args)
    return call
