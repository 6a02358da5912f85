"""``Trainer``: one run's model, optimizer, EMA and loss, and ``train_step``, one optimizer step
(gradient accumulation, clipping, the non-finite skip, the EMA update).

It needs no run folder and no process group: ``Trainer(cfg, model)`` trains on one process, and
``dip.train.run`` wraps it in everything a run needs (data, resume, checkpoints, samples, FID).
The optimizer is fused AdamW on CUDA, the autocast bf16, and the EMA update one
``torch._foreach_lerp_`` over all parameters. The one host sync per step is the non-finite check
(an all-reduced flag) before the optimizer step.
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..diffusion import drop_labels
from ..distributed import (DistEnv, any_rank_nonfinite, average_gradients, fully_shard_fn, is_dtensor,
                           load_model_full_state_dict, load_optimizer_full_state_dict, model_full_state_dict,
                           no_sync, optimizer_full_state_dict)
from ..ema import EMA
from ..errors import TrainingDiverged
from ..run_folder import kill_point
from ..sharded_checkpoint import load_tensors
from .config import TrainConfig
from .step import (build_objective, build_repa, compile_fn, compile_for_sharding, draw_loss_inputs, lr_at,
                   make_loss_fn, step_generator)


@dataclass
class StepResult:
    loss: torch.Tensor       # the step's mean loss over its micro-batches (this rank), a 0-d tensor
    grad_norm: torch.Tensor  # the global gradient norm before clipping
    lr: float
    applied: bool            # False when a non-finite loss or gradient norm skipped the update


def wrap_for_parallel(model: torch.nn.Module, cfg: TrainConfig, env: DistEnv) -> torch.nn.Module:
    """The module the step runs: FSDP2-sharded in place, DDP-wrapped, or the model itself."""
    if not env.distributed:
        return model
    if cfg.parallel == "fsdp":
        fully_shard = fully_shard_fn()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device = env.device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        # fused is the fastest; FSDP2's sharded DTensor params take the foreach path instead
        kwargs["fused" if cfg.parallel != "fsdp" else "foreach"] = True
    return torch.optim.AdamW(model.parameters(), **kwargs)


class Trainer:
    """``Trainer(cfg, model, env)`` takes a freshly built (or initialised) model and sets up the rest
    in a fixed order, so the random draws of a run do not depend on where it was set up."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, env: Optional[DistEnv] = None):
        env = env or DistEnv()
        if cfg.global_batch % (env.world_size * cfg.grad_accum):
            raise ValueError(f"global_batch={cfg.global_batch} must be divisible by world_size*grad_accum="
                             f"{env.world_size}*{cfg.grad_accum}")
        self.cfg, self.env, self.model = cfg, env, model
        self.micro_batch = cfg.global_batch // env.world_size // cfg.grad_accum
        self.null_class = model.num_classes
        if cfg.compile and env.distributed:
            compile_for_sharding(model, cfg)
        self.train_model = wrap_for_parallel(model, cfg, env)
        self.ema = EMA(model, cfg.ema)
        self.optimizer = build_optimizer(model, cfg, env.device)
        self.objective = build_objective(cfg)
        self.repa = build_repa(cfg, model.hidden_size, env.device)
        if self.repa is not None:
            # the projector trains with the model; its gradients are averaged by hand (it is tiny)
            self.optimizer.add_param_group({"params": list(self.repa.projector.parameters())})
        self.loss_fn = make_loss_fn(self.objective, self.repa, cfg.repa_weight)
        if cfg.compile and not env.distributed:
            if self.repa is None:
                self.loss_fn = compile_fn(self.loss_fn, cfg)
            else:
                # the frozen REPA encoder may be TorchScript, which Dynamo does not trace: the model alone
                model.compile(fullgraph=True, dynamic=False, backend=cfg.compile_backend)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        self.nonfinite_skipped = 0   # steps skipped for a non-finite loss or gradient norm (cfg.skip_nonfinite)
        self.kept = "no checkpoint was written yet"  # what a stop on a non-finite step leaves, for its message

    def trained_parameters(self) -> List[torch.nn.Parameter]:
        params = list(self.model.parameters())
        return params + list(self.repa.projector.parameters()) if self.repa is not None else params

    def train_step(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Optimizer step ``step`` (counting from 1) on this rank's share of the global batch."""
        cfg, env = self.cfg, self.env
        lr = lr_at(cfg, step - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = self._accumulate_gradients(step, images, labels)
        if self.repa is not None and env.distributed:
            average_gradients(list(self.repa.projector.parameters()), env.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters(),
                                                   cfg.grad_clip if cfg.grad_clip else float("inf"))
        if is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        # one host sync per step, before the update: a non-finite step must never reach the weights
        if any_rank_nonfinite(step_loss, grad_norm, env):
            self._skip_nonfinite(step, step_loss, grad_norm)
            return StepResult(step_loss, grad_norm, lr, applied=False)
        self.optimizer.step()
        self.ema.update(self.model)
        return StepResult(step_loss, grad_norm, lr, applied=True)

    def _accumulate_gradients(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg, env, micro = self.cfg, self.env, self.micro_batch
        step_loss = torch.zeros((), device=env.device)
        for j in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, step, env.rank * cfg.grad_accum + j, env.device)
            x = images[j * micro:(j + 1) * micro]
            y = drop_labels(labels[j * micro:(j + 1) * micro], self.null_class, cfg.label_dropout, gen)
            draws = draw_loss_inputs(self.objective, x, gen)
            with no_sync(self.train_model, env, last_micro=j == cfg.grad_accum - 1):
                with self.autocast():
                    loss = self.loss_fn(self.train_model, x, y, draws).float()
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
            kill_point("accumulate", step)
        return step_loss

    def _skip_nonfinite(self, step: int, step_loss: torch.Tensor, grad_norm: torch.Tensor):
        cfg = self.cfg
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped > cfg.skip_nonfinite:
            allowed = f" (after skipping {cfg.skip_nonfinite})" if cfg.skip_nonfinite else ""
            here = f"loss {float(step_loss):.4g}, grad norm {float(grad_norm):.4g}"
            raise TrainingDiverged(
                f"step {step}: the loss or gradient norm is not finite{allowed} (on rank {self.env.rank}: {here}); "
                f"stopped without saving, {self.kept} (lower --lr, set --grad-clip, or --skip-nonfinite N "
                "to skip such steps)")
        self.optimizer.zero_grad(set_to_none=True)
        if self.env.is_main:
            print(f"step {step}: non-finite loss or gradient norm, update skipped "
                  f"({self.nonfinite_skipped} of at most {cfg.skip_nonfinite})", flush=True)

    # -- the state a checkpoint holds
    def full_state(self) -> Dict[str, Any]:
        """Model, EMA, optimizer and REPA projector, whole, on the main rank (a collective)."""
        is_main = self.env.is_main
        return {
            "model": model_full_state_dict(self.model, is_main),
            "ema": self.ema.full_state_dict(self.model, is_main),
            "optimizer": optimizer_full_state_dict(self.optimizer, is_main),
            "repa_projector": self.repa.projector.state_dict() if self.repa is not None else None,
        }

    def load_full_state(self, state: Dict[str, Any], path: str):
        load_model_full_state_dict(self.model, state["model"], path)
        self.ema.load_full_state_dict(state["ema"])
        load_optimizer_full_state_dict(self.optimizer, state["optimizer"])
        if self.repa is not None and state.get("repa_projector") is not None:
            self.repa.projector.load_state_dict(state["repa_projector"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))

    # -- the state a sharded checkpoint holds (dip.sharded_checkpoint)
    def _optimized_modules(self) -> torch.nn.Module:
        # every module whose parameters the optimizer holds, so each moment gets its parameter's name
        parts = {"model": self.model}
        if self.repa is not None:
            parts["repa_projector"] = self.repa.projector
        return torch.nn.ModuleDict(parts)

    def sharded_state(self) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """(tensors, param groups): this rank's shards of the model, optimizer moments and EMA
        (DTensors under FSDP2, whole tensors otherwise), as torch.distributed.checkpoint saves them;
        the optimizer's param groups as plain values."""
        optimizer = get_optimizer_state_dict(self._optimized_modules(), self.optimizer)
        tensors = {"model": get_model_state_dict(self.model), "optimizer": optimizer["state"],
                   "ema": self.ema.shadow_by_name()}
        if self.repa is not None:
            tensors["repa_projector"] = self.repa.projector.state_dict()
        return tensors, optimizer["param_groups"]

    def load_sharded_state(self, state: Dict[str, Any]):
        """Resume from a sharded checkpoint (``state``: its dip-state.pt), resharded to this run's
        processes; the EMA is read in place."""
        tensors, _ = self.sharded_state()
        load_tensors(tensors, state["sharded"])
        set_model_state_dict(self.model, tensors["model"])
        set_optimizer_state_dict(self._optimized_modules(), self.optimizer,
                                 {"state": tensors["optimizer"], "param_groups": state["optimizer_param_groups"]})
        if self.repa is not None:
            self.repa.projector.load_state_dict(tensors["repa_projector"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
