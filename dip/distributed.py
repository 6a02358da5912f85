"""The process group and what crosses it, for training, sampling and evaluation alike.

``setup_distributed`` joins the group ``torchrun`` describes (or runs as one process) and
``leave_process_group`` leaves it in an order gloo survives. The rest moves values between ranks:
``agree`` (one rank's error stops every rank), ``broadcast``, ``gather_objects``, the whole model
and optimizer state gathered on rank 0 from DDP or FSDP2 (DTensor) shards and scattered back,
``no_sync`` for gradient accumulation, ``average_gradients`` and ``any_rank_nonfinite``.
"""
import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .errors import CheckpointError, TrainingDiverged, UserError

try:  # DTensor is the FSDP2 parameter type; a torch without it has no FSDP2 either
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch < 2.4
    DTensor, distribute_tensor = None, None


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def check_device(device: str):
    """UserError when ``device`` is "cuda" and this torch sees no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")


def setup_distributed(device: str = "auto") -> DistEnv:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT; without them, a single process. NCCL on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world_size, local_rank, dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
        env.initialized_here = True
    return env


def leave_process_group(env: DistEnv, finished: bool) -> None:
    """Destroy the process group this process joined in ``setup_distributed`` (none otherwise).

    DDP's reducer holds the group: left to interpreter shutdown, the two are torn down in any order
    and gloo's threads abort the process (SIGABRT, "terminate called without an active exception")
    after a run that succeeded. So the reducer goes first (its wrapper sits in reference cycles),
    and ranks that finished wait for each other so none closes its connections under a peer
    still talking. A failed rank skips the barrier: its peers may never reach it."""
    if not env.initialized_here:
        return
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def fully_shard_fn():
    """FSDP2's ``fully_shard`` (its import path moved between torch releases)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise RuntimeError(f"parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                               f"this torch is {torch.__version__}. Use parallel=ddp.") from None
    return fully_shard


# ----------------------------------------------------------------------------- values across ranks
def gather_objects(obj, env: DistEnv) -> List[Any]:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# what agree carries from the rank that raised it to the others (the errors dip.cli reports as one line)
SHARED_ERRORS = (UserError, TrainingDiverged, ValueError, OSError, KeyError)


def agree(env: DistEnv, fn: Callable[[], Any], main_only: bool = False) -> Any:
    """``fn()`` on every rank (``main_only``: on rank 0 alone), and if it raised one of
    SHARED_ERRORS on any rank, the same error on every rank, so no rank waits forever in a
    collective for one that stopped. Returns fn's result where it ran, None elsewhere."""
    result, error = None, None
    if env.is_main or not main_only:
        try:
            result = fn()
        except SHARED_ERRORS as err:
            error = err
    if env.distributed:
        reports = gather_objects(None if error is None else (type(error), str(error)), env)
        first = next((r for r in reports if r is not None), None)
        if first is not None and error is None:
            raise first[0](first[1])
    if error is not None:
        raise error
    return result


def broadcast(value, env: DistEnv):
    """Rank 0's ``value`` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank_nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor, env: DistEnv) -> bool:
    """Whether the loss or gradient norm is NaN or infinite on any rank (all ranks get the same answer,
    so they skip or stop together). One host sync."""
    flag = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    if env.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def average_gradients(params, world_size: int):
    """All-reduce the gradients of ``params`` (in one flat buffer) and divide by the world size."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def no_sync(model, env: DistEnv, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP or FSDP2)."""
    if last_micro or not env.distributed:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------- whole state on rank 0
def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full_cpu(t: torch.Tensor, is_main: bool) -> Optional[torch.Tensor]:
    """The whole tensor on CPU on the main rank (a collective for sharded DTensors)."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu().clone() if is_main else None


def distribute_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) sharded as ``target``, a DTensor; ``value`` itself otherwise."""
    if not is_dtensor(target):
        return value
    return distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh, target.placements)


def model_full_state_dict(model, is_main: bool) -> Optional[Dict[str, torch.Tensor]]:
    sd = {k: full_cpu(v, is_main) for k, v in model.state_dict().items()}
    return sd if is_main else None


@torch.no_grad()
def load_model_full_state_dict(model, state: Dict[str, torch.Tensor], path: str):
    if not any(is_dtensor(p) for p in model.parameters()):
        ckpt.load_state_dict_checked(model, state, path)
        return
    own = model.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise CheckpointError(f"{path} does not fit this model: {len(missing)} missing (e.g. {sorted(missing)[0]})")
    for name, target in own.items():
        target.copy_(distribute_like(state[name].to(target.dtype), target))


def optimizer_full_state_dict(optimizer, is_main: bool):
    sd = optimizer.state_dict()
    state = {pid: {k: (full_cpu(v, is_main) if torch.is_tensor(v) else v) for k, v in s.items()}
             for pid, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if is_main else None


def load_optimizer_full_state_dict(optimizer, state):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(is_dtensor(p) for p in params):
        converted = {}
        for pid, s in state["state"].items():
            p = params[int(pid)]
            converted[pid] = {k: (distribute_like(v.to(p.dtype), p)
                                  if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else v)
                              for k, v in s.items()}
        state = {"state": converted, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)
