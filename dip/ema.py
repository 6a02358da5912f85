"""The exponential moving average of a model's weights, shared by training and the demo."""
from typing import Dict, Optional

import torch

from .distributed import distribute_like, full_cpu, local_shard


class EMA:
    """fp32 exponential moving average of a model's parameters, kept with the same sharding as the
    parameters (so FSDP shards the EMA too)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        # one multi-tensor lerp over every parameter (a handful of fused launches, no per-tensor
        # Python loop). It stays on the current stream: overlapping it with the next forward on a
        # side stream would save ~1% of an XL step and need cross-stream syncs before every
        # optimizer step and checkpoint read.
        params = [local_shard(p.detach()).float() for _, p in model.named_parameters()]
        torch._foreach_lerp_([local_shard(s) for s in self.shadow], params, 1.0 - self.decay)

    def shadow_by_name(self) -> Dict[str, torch.Tensor]:
        """The live EMA tensors by parameter name (this rank's shards under FSDP2), for a sharded
        checkpoint to save or load in place."""
        return dict(zip(self.names, self.shadow))

    def full_state_dict(self, model: torch.nn.Module, is_main: bool = True) -> Optional[Dict[str, torch.Tensor]]:
        """A complete model state dict (EMA parameters, the model's buffers) on the main rank."""
        ema = dict(zip(self.names, self.shadow))
        out = {}
        for name, value in model.state_dict().items():
            out[name] = full_cpu(ema.get(name, value), is_main)
        return out if is_main else None

    @torch.no_grad()
    def load_full_state_dict(self, state: Dict[str, torch.Tensor]):
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(distribute_like(state[name].float(), shadow))
