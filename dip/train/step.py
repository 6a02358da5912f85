"""What one training step computes: the objective, its random draws, the loss function and how it
is compiled, the learning rate at a step.

Reproducibility. The randomness of training step ``s`` (label dropout, diffusion time and noise)
comes from a generator seeded by ``(seed, s, shard)``, where the global batch is cut into
``world_size * grad_accum`` equal shards and shard ``rank * grad_accum + j`` is micro-batch ``j`` of
rank ``rank``. So a run gives the same weights (up to float reduction order) whether its shards run
on several processes or one process with gradient accumulation.

Speed. ``compile=True`` runs the loss under ``torch.compile(fullgraph=True)``: the dip custom ops are
opaque nodes with fake implementations, so the whole forward (patchify, every block, the head) and
the flow-matching / DDPM arithmetic around it trace into ONE graph, and the compiled backward comes
from AOTAutograd. The loss's random draws (t or k, then the noise) are made eagerly from the step's
generator first, in the very order the objective would make them, so compiled and eager runs see the
same numbers (Dynamo cannot trace a torch.Generator argument without a graph break). Three cases
compile less than the whole loss, and say so where they are set up: under DDP the model alone (the
inner module, wrapped by DDP afterwards); under FSDP2 each block's ``forward`` (FSDP2's all-gather
hooks stay eager around it); with REPA the model alone (the frozen encoder may be TorchScript, which
Dynamo does not trace).
"""
from typing import Callable, Dict, Optional

import torch

from .. import diffusion
from .config import TrainConfig


def build_objective(cfg: TrainConfig):
    return diffusion.FlowMatching() if cfg.objective == "flow" else diffusion.DDPM()


def build_repa(cfg: TrainConfig, hidden_size: int, device):
    """The REPA module (frozen encoder + trainable projector), or None when cfg.repa is off."""
    if not cfg.repa:
        return None
    if not cfg.repa_encoder:
        raise ValueError("repa needs repa_encoder: the path of a local TorchScript or pickled encoder")
    encoder = diffusion.load_frozen_encoder(cfg.repa_encoder).to(device)
    size = cfg.repa_input_size or cfg.image_size
    with torch.no_grad():
        feats = encoder(torch.zeros(1, 3, size, size, device=device))
    if isinstance(feats, dict):
        feats = feats["x_norm_patchtokens"]
    if isinstance(feats, (tuple, list)):
        feats = feats[0]
    encoder_dim = feats.shape[1] if feats.dim() == 4 else feats.shape[-1]
    return diffusion.REPALoss(encoder, hidden_size=hidden_size, encoder_dim=int(encoder_dim),
                              proj_hidden=cfg.repa_proj_hidden, block=cfg.repa_depth,
                              input_size=cfg.repa_input_size or None).to(device)


def step_generator(seed: int, step: int, shard: int, device: torch.device) -> torch.Generator:
    """The generator for one shard of one step (see the module docstring)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 10_007 + shard)
    return gen


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def draw_loss_inputs(objective, x: torch.Tensor, generator: Optional[torch.Generator]) -> Dict[str, torch.Tensor]:
    """The random inputs of ``objective.loss`` for clean images ``x``, drawn from ``generator`` in the
    objective's own order (t for flow matching or k for DDPM first, then the noise). Passed back as
    overrides they give exactly the loss ``objective.loss(..., generator=generator)`` computes, but
    leave nothing random inside the loss, so it can be compiled as one graph."""
    b = x.shape[0]
    if isinstance(objective, diffusion.DDPM):
        draws = {"k": objective.sample_steps(b, x, generator)}
    else:
        draws = {"t": objective.sample_t(b, x, generator)}
    draws["noise"] = diffusion.randn(x.shape, x, generator)
    return draws


def make_loss_fn(objective, repa=None, repa_weight: float = 0.5) -> Callable:
    """``loss_fn(model, x, y, draws) -> float32 scalar``: the objective's total loss for the inputs of
    ``draw_loss_inputs``; free of Python side effects, so ``torch.compile(loss_fn, fullgraph=True)``
    traces it (with the model's forward) into one graph."""
    def loss_fn(model, x, y, draws):
        return objective.loss(model, x, y, repa=repa, repa_weight=repa_weight, **draws)["loss"]
    return loss_fn


def compile_fn(fn, cfg: TrainConfig):
    # dynamic=False: training shapes never change, and a static graph is what the step should run
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=cfg.compile_backend)


def compile_for_sharding(model, cfg: TrainConfig):
    """The compile variants a distributed wrapper allows; must run before the wrapping."""
    if cfg.parallel == "fsdp":
        # FSDP2 all-gathers each block's parameters in forward pre-hooks that must stay eager:
        # compile each block's forward (and the head's, inside the root unit) so the hooks run
        # around the compiled code
        for block in model.blocks:
            block.forward = compile_fn(block.forward, cfg)
        model.head.forward = compile_fn(model.head.forward, cfg)
    else:
        # DDP's forward (bucket bookkeeping, prepare_for_backward) does not trace into one
        # fullgraph graph; compiling DDP itself would need DDPOptimizer's graph splits. So the
        # inner module is compiled whole and DDP wraps it. The price: gradient all-reduces start
        # only when the compiled backward has finished, not bucket by bucket during it.
        model.compile(fullgraph=True, dynamic=False, backend=cfg.compile_backend)
