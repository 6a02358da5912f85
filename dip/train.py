"""Training loop for DiP: single process, or many via ``torchrun`` (DDP by default, FSDP2 optional).

Reproducibility. The randomness of training step ``s`` (label dropout, diffusion time and noise)
comes from a generator seeded by ``(seed, s, shard)``, where the global batch is cut into
``world_size * grad_accum`` equal shards and shard ``rank * grad_accum + j`` is micro-batch ``j`` of
rank ``rank``. Data order is a pure function of ``(seed, epoch)`` (dip.data.ResumableBatchSampler).
So a run gives the same weights (up to float reduction order) whether its shards run on several
processes or one process with gradient accumulation, and a resumed run repeats an uninterrupted
one exactly.

Speed. ``compile=True`` runs the loss under ``torch.compile(fullgraph=True)``: the dip custom ops are
opaque nodes with fake implementations, so the whole forward (patchify, every block, the head) and
the flow-matching / DDPM arithmetic around it trace into ONE graph, and the compiled backward comes
from AOTAutograd. The loss's random draws (t or k, then the noise) are made eagerly from the step's
generator first, in the very order the objective would make them, so compiled and eager runs see the
same numbers (Dynamo cannot trace a torch.Generator argument without a graph break). Three cases compile
less than the whole loss, and say so in a comment where they are set up: under DDP the model alone
(the inner module, wrapped by DDP afterwards); under FSDP2 each block's ``forward`` (FSDP2's
all-gather hooks stay eager around it); with REPA the model alone (the frozen encoder may be
TorchScript, which Dynamo does not trace). The optimizer is fused AdamW on CUDA, the autocast is bf16,
and the EMA update is one ``torch._foreach_lerp_`` over all parameters. The one host sync per step
is the non-finite check (an all-reduced flag) before the optimizer step.

Safety. The run folder is locked and never silently replaced, a resume must match the checkpoint's
run settings, and nothing non-finite is ever saved: see dip.run_folder and dip.checkpoint.
"""
import contextlib
import copy
import dataclasses
import gc
import math
import os
import random
import time
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .diffusion import drop_labels
from .data import CountReadFailures, ImageFolderDataset, ResumableBatchSampler, advance_position, collate
from .errors import CheckpointError, TrainingDiverged, UserError
from .official import nonfinite_tensors
from .run_folder import METRICS_NAME, SAMPLES_DIR, MetricsLog, RunFolder, config_changes, kill_point


@dataclass
class TrainConfig:
    model: str = "DiP-B/16"                 # a dip.models.CONFIGS name
    model_overrides: Dict[str, Any] = field(default_factory=dict)  # DiPConfig fields, e.g. {"head": "none"}
    data: str = ""                          # image folder (one subfolder per class, or images = 1 class)
    out: str = "outputs/run"
    image_size: int = 256
    global_batch: int = 256                 # summed over all processes and accumulation steps
    grad_accum: int = 1                     # micro-batches per process per step
    steps: int = 400_000
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0                   # linear lr warm-up
    ema: float = 0.9999                     # EMA decay (the EMA is kept in fp32)
    label_dropout: float = 0.1              # share of labels replaced by the null class (for CFG)
    grad_clip: Optional[float] = None       # max global grad norm; None = no clipping
    grad_checkpointing: bool = False       # recompute each block's activations in backward (less memory)
    compile: bool = False                   # torch.compile the training loss (see the module docstring)
    compile_backend: str = "inductor"       # torch.compile backend; aot_eager traces without code generation
    objective: str = "flow"                 # flow | ddpm
    repa: bool = False                      # REPA representation alignment
    repa_weight: float = 0.5
    repa_depth: int = 8                     # align the tokens after this block
    repa_encoder: str = ""                  # local TorchScript / pickled encoder (dip.diffusion.load_frozen_encoder)
    repa_input_size: int = 224              # encoder input resolution; 0 = the training resolution
    repa_proj_hidden: int = 2048
    random_flip: bool = True
    num_workers: int = 4
    log_interval: int = 100
    ckpt_interval: int = 10_000
    keep_numbered_ckpts: bool = False       # also keep step_XXXXXXXX.pt at every checkpoint
    sample_interval: int = 0                # 0 = never sample during training
    sample_steps: int = 50
    sample_cfg_scale: float = 1.0
    fid_interval: int = 0                   # 0 = never; else FID of fid_samples EMA samples every N steps
    fid_samples: int = 1000                 # same classes and noises each time (sample_steps, sample_cfg_scale)
    fid_ref: str = ""                       # image folder, ADM .npz or statistics .npz (dip.evaluate)
    fid_extractor: str = ""                 # feature network file; "" = the bundled Inception (the [eval] extra)
    seed: int = 0
    precision: str = "auto"                 # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    parallel: str = "ddp"                   # ddp | fsdp (FSDP2, torch.distributed.fsdp.fully_shard)
    resume: Optional[str] = None            # checkpoint file or run folder; "auto" = <out>/latest.pt (see dip.run_folder)
    overwrite: bool = False                 # start a new run in an out folder that holds one, replacing it
    skip_nonfinite: int = 0                 # steps with a non-finite loss / grad norm to skip before stopping
    init_from: Optional[str] = None         # a new run from these weights (dip-train or official; dip.official)
    device: str = "auto"                    # auto | cpu | cuda
    progress: bool = True

    def validate(self):
        _check_field_types(self)
        checks = [
            (self.image_size > 0, "image_size must be positive"),
            (self.global_batch > 0, "global_batch must be positive"),
            (self.grad_accum > 0, "grad_accum must be positive"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr > 0, "lr must be positive"),
            (0.0 <= self.ema < 1.0, "ema must be in [0, 1)"),
            (0.0 <= self.label_dropout <= 1.0, "label_dropout must be in [0, 1]"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive or None"),
            (self.objective in ("flow", "ddpm"), f"objective must be flow or ddpm, got {self.objective!r}"),
            (self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}"),
            (self.parallel in ("ddp", "fsdp"), f"parallel must be ddp or fsdp, got {self.parallel!r}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.log_interval > 0 and self.ckpt_interval > 0, "log_interval and ckpt_interval must be positive"),
            (self.sample_interval >= 0, "sample_interval must be >= 0"),
            (self.skip_nonfinite >= 0, "skip_nonfinite must be >= 0"),
            (self.fid_interval >= 0, "fid_interval must be >= 0"),
            (not self.fid_interval or bool(self.fid_ref), "fid_interval needs fid_ref (reference images or statistics)"),
            (self.fid_samples >= 2, "fid_samples must be >= 2"),
            (isinstance(self.compile_backend, str) and bool(self.compile_backend),
             "compile_backend must be a torch.compile backend name"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return names.get(typing.get_origin(tp) or tp, str(tp))


def _conform(value, tp):
    """``value`` as type ``tp`` (an int is a valid float; YAML reads 1e-4 as a string, so a
    number-shaped string is too), or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        return _conform(value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(tp)):
            return tuple(_conform(v, a) for v, a in zip(value, typing.get_args(tp)))
        raise TypeError
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is int and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, origin or tp):
        raise TypeError
    return value


def _check_field_types(cfg):
    """Every TrainConfig field holds a value of its declared type (a mistyped --set value, or a
    YAML config's, fails here in one line rather than as a TypeError deep in the run)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if hints[f.name] is Any:
            continue
        try:
            setattr(cfg, f.name, _conform(value, hints[f.name]))
        except TypeError:
            raise ValueError(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r}") from None


def load_config(name_or_yaml: str, **overrides) -> TrainConfig:
    """A TrainConfig from a model name (``"DiP-B/16"``) or a YAML file of TrainConfig fields, whose
    ``model`` may be a name or ``{name: ..., <DiPConfig field>: ...}``; ``overrides`` win."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: Dict[str, Any] = {}
    if name_or_yaml.endswith((".yaml", ".yml")) or os.path.isfile(name_or_yaml):
        import yaml
        if not os.path.isfile(name_or_yaml):
            raise FileNotFoundError(f"config file {name_or_yaml!r} does not exist")
        with open(name_or_yaml) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
                problem = getattr(err, "problem", None) or type(err).__name__
                raise ValueError(f"config file {name_or_yaml!r} is not valid YAML{at}: {problem}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {name_or_yaml!r} must hold a mapping of TrainConfig fields")
        model = values.get("model")
        if isinstance(model, dict):
            model = dict(model)
            if "name" not in model:
                raise ValueError(f"{name_or_yaml}: model must have a name")
            values["model"] = model.pop("name")
            values["model_overrides"] = {**model, **values.get("model_overrides", {})}
    else:
        values["model"] = name_or_yaml
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return TrainConfig(**values).validate()


# ----------------------------------------------------------------------------- distributed setup
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


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise RuntimeError(f"parallel=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                               f"this torch is {torch.__version__}. Use parallel=ddp.") from None
    return fully_shard


def _is_dtensor(t):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _full_cpu(t: torch.Tensor, is_main: bool) -> Optional[torch.Tensor]:
    """The whole tensor on CPU on the main rank (a collective for sharded DTensors)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu().clone() if is_main else None


# ----------------------------------------------------------------------------- EMA
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
        params = [_local(p.detach()).float() for _, p in model.named_parameters()]
        torch._foreach_lerp_([_local(s) for s in self.shadow], params, 1.0 - self.decay)

    def full_state_dict(self, model: torch.nn.Module, is_main: bool) -> Optional[Dict[str, torch.Tensor]]:
        """A complete model state dict (EMA parameters, the model's buffers) on the main rank."""
        ema = dict(zip(self.names, self.shadow))
        out = {}
        for name, value in model.state_dict().items():
            out[name] = _full_cpu(ema.get(name, value), is_main)
        return out if is_main else None

    @torch.no_grad()
    def load_full_state_dict(self, state: Dict[str, torch.Tensor]):
        for name, shadow in zip(self.names, self.shadow):
            value = state[name].float()
            if _is_dtensor(shadow):
                from torch.distributed.tensor import distribute_tensor
                shadow.copy_(distribute_tensor(value.to(shadow.device_mesh.device_type), shadow.device_mesh,
                                               shadow.placements))
            else:
                shadow.copy_(value)


# ----------------------------------------------------------------------------- state (de)serialisation
def _model_full_state_dict(model, is_main):
    sd = {k: _full_cpu(v, is_main) for k, v in model.state_dict().items()}
    return sd if is_main else None


@torch.no_grad()
def _load_model_full_state_dict(model, state, path):
    if not any(_is_dtensor(p) for p in model.parameters()):
        ckpt.load_state_dict_checked(model, state, path)
        return
    from torch.distributed.tensor import distribute_tensor
    own = model.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise CheckpointError(f"{path} does not fit this model: {len(missing)} missing (e.g. {sorted(missing)[0]})")
    for name, target in own.items():
        value = state[name].to(target.dtype)
        if _is_dtensor(target):
            value = distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh, target.placements)
        target.copy_(value)


def _optimizer_full_state_dict(optimizer, is_main):
    sd = optimizer.state_dict()
    state = {pid: {k: (_full_cpu(v, is_main) if torch.is_tensor(v) else v) for k, v in s.items()}
             for pid, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if is_main else None


def _load_optimizer_full_state_dict(optimizer, state):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(_is_dtensor(p) for p in params):
        from torch.distributed.tensor import distribute_tensor
        converted = {}
        for pid, s in state["state"].items():
            p = params[int(pid)]
            converted[pid] = {
                k: (distribute_tensor(v.to(p.device_mesh.device_type, p.dtype), p.device_mesh, p.placements)
                    if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else v)
                for k, v in s.items()}
        state = {"state": converted, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)


def _gather_objects(obj, env: DistEnv):
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- objectives
def build_objective(cfg: TrainConfig):
    from . import diffusion
    if cfg.objective == "flow":
        return diffusion.FlowMatching()
    return diffusion.DDPM()


def build_repa(cfg: TrainConfig, hidden_size: int, device):
    """The REPA module (frozen encoder + trainable projector), or None when cfg.repa is off."""
    if not cfg.repa:
        return None
    from . import diffusion
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
    from . import diffusion
    b = x.shape[0]
    if isinstance(objective, diffusion.DDPM):
        draws = {"k": objective.sample_steps(b, x, generator)}
    else:
        draws = {"t": objective.sample_t(b, x, generator)}
    draws["noise"] = diffusion._randn(x.shape, x, generator)
    return draws


def make_loss_fn(objective, repa=None, repa_weight: float = 0.5) -> Callable:
    """``loss_fn(model, x, y, draws) -> float32 scalar``: the objective's total loss for the inputs of
    ``draw_loss_inputs``; free of Python side effects, so ``torch.compile(loss_fn, fullgraph=True)``
    traces it (with the model's forward) into one graph."""
    def loss_fn(model, x, y, draws):
        return objective.loss(model, x, y, repa=repa, repa_weight=repa_weight, **draws)["loss"]
    return loss_fn


def _compile(fn, cfg):
    # dynamic=False: training shapes never change, and a static graph is what the step should run
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=cfg.compile_backend)


def _compile_for_sharding(model, cfg):
    """The compile variants a distributed wrapper allows; must run before the wrapping."""
    if cfg.parallel == "fsdp":
        # FSDP2 all-gathers each block's parameters in forward pre-hooks that must stay eager:
        # compile each block's forward (and the head's, inside the root unit) so the hooks run
        # around the compiled code
        for block in model.blocks:
            block.forward = _compile(block.forward, cfg)
        model.head.forward = _compile(model.head.forward, cfg)
    else:
        # DDP's forward (bucket bookkeeping, prepare_for_backward) does not trace into one
        # fullgraph graph; compiling DDP itself would need DDPOptimizer's graph splits. So the
        # inner module is compiled whole and DDP wraps it. The price: gradient all-reduces start
        # only when the compiled backward has finished, not bucket by bucket during it.
        model.compile(fullgraph=True, dynamic=False, backend=cfg.compile_backend)


# ----------------------------------------------------------------------------- the loop
def _build_dataset(cfg):
    if not cfg.data:
        raise ValueError("no training data: set data to an image folder")
    return ImageFolderDataset(cfg.data, cfg.image_size, random_flip=cfg.random_flip)


# what _agree carries from the rank that raised it to the others (the errors dip.cli reports as one line)
_SHARED_ERRORS = (UserError, TrainingDiverged, ValueError, OSError, KeyError)


def _agree(env: DistEnv, fn: Callable[[], Any], main_only: bool = False) -> Any:
    """``fn()`` on every rank (``main_only``: on rank 0 alone), and if it raised one of
    _SHARED_ERRORS on any rank, the same error on every rank, so no rank waits forever in a
    collective for one that stopped. Returns fn's result where it ran, None elsewhere."""
    result, error = None, None
    if env.is_main or not main_only:
        try:
            result = fn()
        except _SHARED_ERRORS as err:
            error = err
    if env.distributed:
        reports = _gather_objects(None if error is None else (type(error), str(error)), env)
        first = next((r for r in reports if r is not None), None)
        if first is not None and error is None:
            raise first[0](first[1])
    if error is not None:
        raise error
    return result


def _broadcast(value, env: DistEnv):
    """Rank 0's ``value`` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _open_run_folder(cfg) -> Tuple[RunFolder, Optional[str]]:
    """(the locked run folder, the checkpoint to resume from or None) on the main rank."""
    folder = RunFolder.acquire(cfg.out)
    try:
        return folder, folder.start(cfg.resume, cfg.overwrite)
    except BaseException:
        folder.release()
        raise


def _model_config_of(cfg, overrides, build_model) -> Dict[str, Any]:
    # built on the meta device: the config without the cost of allocating and initialising weights
    with torch.device("meta"):
        return dataclasses.asdict(build_model(cfg.model, **overrides).config)


def _run_identity(cfg, model_config, dataset) -> Dict[str, Any]:
    """What config_changes compares between a checkpoint and a resumed run."""
    classes = getattr(dataset, "classes", None)
    return {"config": dataclasses.asdict(cfg), "model_config": model_config,
            "classes": list(classes) if classes is not None else None}


def _load_resume_state(path, cfg, model_config, dataset, is_main) -> Dict[str, Any]:
    """The checkpoint at ``path``, refused (CheckpointError, one line) when the run it was written
    under cannot be continued with ``cfg``; the allowed changes are printed on the main rank."""
    state = ckpt.load_checkpoint(path)
    for key in ("model", "ema", "optimizer", "step", "data"):
        if key not in state:
            raise CheckpointError(f"{path} is not a checkpoint dip-train can resume (it has no {key!r}); "
                                  "to start a new run from its weights, use --init-from")
    from .models import canonical_model_config  # a run saved with an earlier name of its head
    state = {**state, "model_config": canonical_model_config(state.get("model_config"))}
    refused, allowed = config_changes(state, _run_identity(cfg, model_config, dataset))
    if refused:
        raise CheckpointError(f"cannot resume {path} with another run's settings: {'; '.join(refused)} "
                              "(start a new run: another --out, or --overwrite)")
    if allowed and is_main:
        print(f"resume: changed settings: {'; '.join(allowed)}", flush=True)
    return state


def _init_weights(cfg, resume_path: Optional[str]):
    """For init_from: (the weights a new run starts from, or None when a resume continues the run;
    the number of classes of those weights, which the model keeps on resuming too)."""
    if not cfg.init_from:
        return None, None
    from .official import read_checkpoint, read_init_weights
    if resume_path:
        return None, int(read_checkpoint(resume_path).state["model_config"]["num_classes"])
    init = read_init_weights(cfg.init_from)
    return init, init.num_classes


def _ema_model(model_config, ema_state, device):
    from .models import build_model
    model = build_model(model_config).to(device)
    model.load_state_dict(ema_state)
    return model.eval()


def _sample_grid(cfg, model_config, ema_state, num_classes, step, device):
    from . import sample as sampling
    model = _ema_model(model_config, ema_state, device)
    n = min(16, max(4, num_classes))
    labels = torch.arange(n) % num_classes
    images = sampling.sample(model, labels, cfg.image_size, steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale,
                             seed=cfg.seed, method="euler", device=device, progress=False)
    path = os.path.join(cfg.out, SAMPLES_DIR, f"step_{step:08d}.png")
    sampling.save_grid(images, path)
    return path


def _training_fid(cfg, num_classes, device):
    """The FID meter of ``cfg.fid_*`` (network and reference statistics loaded once, here)."""
    from .evaluate import TrainingFID
    return TrainingFID(cfg.fid_ref, cfg.fid_samples, num_classes, cfg.image_size, steps=cfg.sample_steps,
                       cfg_scale=cfg.sample_cfg_scale, method="euler" if cfg.objective == "flow" else "ddim",
                       seed=cfg.seed, extractor=cfg.fid_extractor or None, device=device, progress=cfg.progress)


def train(cfg: TrainConfig, dataset=None, on_step: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Dict[str, Any]:
    """Train per ``cfg``. ``dataset`` replaces the image folder (any dataset of (image, label) with a
    ``num_classes`` attribute that accepts ``(index, flip)`` items). ``on_step(step, info)`` is called
    after every optimizer step (step counts from 1). Returns the final step, last logged loss, the
    path of the latest checkpoint and the number of unreadable images skipped.

    The run folder ``cfg.out`` is locked for the whole run and never silently destroyed (see
    dip.run_folder). Raises TrainingDiverged when the loss or gradient norm is not finite (beyond
    ``cfg.skip_nonfinite`` skipped steps); the last checkpoint is then left as it was."""
    from .models import DiPConfig, build_model

    cfg.validate()
    env = setup_distributed(cfg.device)
    finished = False
    try:
        with contextlib.ExitStack() as cleanup:
            opened = _agree(env, lambda: _open_run_folder(cfg), main_only=True)
            folder, resume_path = opened if env.is_main else (None, None)
            if folder is not None:
                cleanup.callback(folder.release)
            resume_path = _broadcast(resume_path, env)
            result = _train(cfg, env, folder, resume_path, cleanup, dataset, on_step, DiPConfig, build_model)
            finished = True
            return result
    finally:
        leave_process_group(env, finished)


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


def _train(cfg, env, folder, resume_path, cleanup, dataset, on_step, DiPConfig, build_model):
    device = env.device
    if cfg.global_batch % (env.world_size * cfg.grad_accum):
        raise ValueError(f"global_batch={cfg.global_batch} must be divisible by world_size*grad_accum="
                         f"{env.world_size}*{cfg.grad_accum}")
    local_batch = cfg.global_batch // env.world_size
    micro_batch = local_batch // cfg.grad_accum
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if env.is_main and folder.removed_temporaries:
        print(f"removed {len(folder.removed_temporaries)} temporary files a killed run left in {cfg.out}", flush=True)

    def prepare():
        data = dataset if dataset is not None else _build_dataset(cfg)
        n_classes = int(getattr(data, "num_classes", 1))
        init, init_classes = _init_weights(cfg, resume_path)
        overrides = dict(cfg.model_overrides)
        if init_classes is not None:
            overrides.setdefault("num_classes", init_classes)  # the weights' classes, not the data's
        overrides.setdefault("num_classes", n_classes)
        if overrides["num_classes"] < n_classes:
            raise ValueError(f"the data has {n_classes} classes but the model num_classes={overrides['num_classes']}")
        model_config = _model_config_of(cfg, overrides, build_model)
        state = _load_resume_state(resume_path, cfg, model_config, data, env.is_main) if resume_path else None
        return data, n_classes, overrides, state, init

    # every rank scans the data and reads the checkpoint; an error on one stops them all
    dataset, num_classes, overrides, state, init = _agree(env, prepare)

    # -- model: identical initialisation on every rank, then per-rank RNG streams
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **overrides).to(device)
    model_config = model.config
    if init is not None:
        init.load_into(model, f"the model of this run ({cfg.model})")
    null_class = model.num_classes
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    torch.manual_seed(cfg.seed + env.rank)
    np.random.seed((cfg.seed + env.rank) % 2 ** 32)
    random.seed(cfg.seed + env.rank)

    raw_model = model
    if cfg.compile and env.distributed:
        _compile_for_sharding(model, cfg)
    if cfg.parallel == "fsdp" and env.distributed:
        fully_shard = _fully_shard()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        train_model = model
    elif env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = model

    ema = EMA(raw_model, cfg.ema)
    if init is not None:
        if init.ema is not None:
            ema.load_full_state_dict(init.ema)
        if env.is_main:
            print(f"initialised from {init.path}, {init.description}"
                  f"{' (EMA from its EMA weights)' if init.ema is not None else ''}", flush=True)
        del init
    opt_kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        # fused is the fastest; FSDP2's sharded DTensor params take the foreach path instead
        opt_kwargs["fused" if cfg.parallel != "fsdp" else "foreach"] = True
    optimizer = torch.optim.AdamW(raw_model.parameters(), **opt_kwargs)
    objective = build_objective(cfg)
    repa = build_repa(cfg, raw_model.hidden_size, device)
    if repa is not None:
        # the projector trains with the model; its gradients are averaged by hand (it is tiny)
        optimizer.add_param_group({"params": list(repa.projector.parameters())})
    loss_fn = make_loss_fn(objective, repa, cfg.repa_weight)
    if cfg.compile and not env.distributed:
        if repa is None:
            loss_fn = _compile(loss_fn, cfg)
        else:
            # the frozen REPA encoder may be TorchScript, which Dynamo does not trace: the model alone
            raw_model.compile(fullgraph=True, dynamic=False, backend=cfg.compile_backend)

    # -- resume
    start_step, epoch, index = 0, 0, 0
    unreadable = 0        # unreadable images met in the batches this rank consumed (rank 0: plus the checkpoint's)
    nonfinite_skipped = 0  # steps skipped for a non-finite loss or gradient norm (cfg.skip_nonfinite)
    if state is not None:
        _load_model_full_state_dict(raw_model, state["model"], resume_path)
        ema.load_full_state_dict(state["ema"])
        _load_optimizer_full_state_dict(optimizer, state["optimizer"])
        if repa is not None and state.get("repa_projector") is not None:
            repa.projector.load_state_dict(state["repa_projector"])
        start_step = int(state["step"])
        epoch, index = int(state["data"]["epoch"]), int(state["data"]["index"])
        if env.is_main:
            unreadable = int(state.get("unreadable_images", 0))
        nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        if state["data"].get("dataset_size") not in (None, len(dataset)):
            warnings.warn(f"the dataset had {state['data']['dataset_size']} images when the checkpoint was "
                          f"written and has {len(dataset)} now; data order will differ", RuntimeWarning)
            index = min(index, len(dataset) - 1)
        rng = state.get("rng") or []
        if len(rng) == env.world_size:
            ckpt.restore_rng_state(rng[env.rank])
        if env.is_main:
            print(f"resumed from {resume_path} at step {start_step}", flush=True)
    elif resume_path is None and cfg.resume and env.is_main:
        print(f"--resume: {cfg.out} holds no run yet; starting a new one", flush=True)
    del state

    sampler = ResumableBatchSampler(len(dataset), cfg.global_batch, env.rank, env.world_size, seed=cfg.seed,
                                    epoch=epoch, index=index, shuffle=True)
    loader = DataLoader(CountReadFailures(dataset), batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0, prefetch_factor=2 if cfg.num_workers > 0 else None)

    def total_unreadable():
        return sum(_gather_objects(unreadable, env))

    def save(step, epoch, index):
        gathered = _gather_objects((ckpt.capture_rng_state(), unreadable), env)
        state = {
            "model": _model_full_state_dict(raw_model, env.is_main),
            "ema": ema.full_state_dict(raw_model, env.is_main),
            "optimizer": _optimizer_full_state_dict(optimizer, env.is_main),
            "repa_projector": repa.projector.state_dict() if repa is not None else None,
        }

        def write():
            bad = nonfinite_tensors(state["model"]) + nonfinite_tensors(state["ema"])
            if bad:
                raise TrainingDiverged(f"step {step}: the weights hold NaN or infinity ({bad[0]}); nothing was saved, "
                                       f"{_kept(latest)}")
            state.update({
                "step": step,
                "data": {"epoch": epoch, "index": index, "seed": cfg.seed, "dataset_size": len(dataset),
                         "global_batch": cfg.global_batch},
                "unreadable_images": sum(g[1] for g in gathered),
                "rng": [g[0] for g in gathered],
                "config": dataclasses.asdict(cfg),
                "model_config": dataclasses.asdict(model_config),
                "classes": identity["classes"],
                "num_classes": num_classes,
                "world_size": env.world_size,
                "nonfinite_skipped": nonfinite_skipped,
            })
            return ckpt.save_checkpoint(state, cfg.out, step, keep_numbered=cfg.keep_numbered_ckpts,
                                        before_rename=lambda: kill_point("checkpoint", step))

        _agree(env, write, main_only=True)
        return os.path.join(cfg.out, ckpt.LATEST)

    identity = _run_identity(cfg, dataclasses.asdict(model_config), dataset)
    # on the main rank, before any step, so a bad reference or missing network fails at once
    fid_meter = (_agree(env, lambda: _training_fid(cfg, num_classes, device), main_only=True)
                 if cfg.fid_interval else None)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    postfix = {}
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    last_loss = float("nan")
    grad_norm = torch.zeros((), device=device)
    t_last, images_since = time.perf_counter(), 0
    t_start = time.perf_counter()
    latest = resume_path
    metrics, bar = None, None
    if env.is_main:
        if cfg.overwrite:
            folder.clear_previous_run()  # only now: a run that failed to set up has replaced nothing
        metrics = MetricsLog(os.path.join(cfg.out, METRICS_NAME), resume_step=start_step)
        cleanup.callback(metrics.close)
        if metrics.dropped:
            print(f"{METRICS_NAME}: dropped {metrics.dropped} lines after step {start_step} "
                  "(logged again from here) or torn by a kill", flush=True)
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
            cleanup.callback(bar.close)
    train_model.train()

    data_iter = iter(loader)
    step = start_step
    for step in range(start_step + 1, cfg.steps + 1):
        images, labels, failed_reads = next(data_iter)
        unreadable += failed_reads
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        lr = lr_at(cfg, step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for j in range(cfg.grad_accum):
            shard = env.rank * cfg.grad_accum + j
            gen = step_generator(cfg.seed, step, shard, device)
            x = images[j * micro_batch:(j + 1) * micro_batch]
            y = drop_labels(labels[j * micro_batch:(j + 1) * micro_batch], null_class, cfg.label_dropout, gen)
            last_micro = j == cfg.grad_accum - 1
            draws = draw_loss_inputs(objective, x, gen)
            with _no_sync(train_model, cfg, env, last_micro):
                with autocast:
                    loss = loss_fn(train_model, x, y, draws).float()
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
        if repa is not None and env.distributed:
            _average_gradients(list(repa.projector.parameters()), env.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(_trained_params(raw_model, repa),
                                                   cfg.grad_clip if cfg.grad_clip else float("inf"))
        if _is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        # one host sync per step, before the update: a non-finite step must never reach the weights
        if _any_rank_nonfinite(step_loss, grad_norm, env):
            nonfinite_skipped += 1
            if nonfinite_skipped > cfg.skip_nonfinite:
                allowed = f" (after skipping {cfg.skip_nonfinite})" if cfg.skip_nonfinite else ""
                here = f"loss {float(step_loss):.4g}, grad norm {float(grad_norm):.4g}"
                raise TrainingDiverged(
                    f"step {step}: the loss or gradient norm is not finite{allowed} (on rank {env.rank}: {here}); "
                    f"stopped without saving, {_kept(latest)} (lower --lr, set --grad-clip, or --skip-nonfinite N "
                    "to skip such steps)")
            optimizer.zero_grad(set_to_none=True)
            if env.is_main:
                print(f"step {step}: non-finite loss or gradient norm, update skipped "
                      f"({nonfinite_skipped} of at most {cfg.skip_nonfinite})", flush=True)
        else:
            optimizer.step()
            ema.update(raw_model)
            loss_sum += step_loss
            loss_count += 1
        epoch, index = advance_position(epoch, index, len(dataset), cfg.global_batch)
        images_since += cfg.global_batch
        kill_point("step", step)

        info = {}
        if step % cfg.log_interval == 0 or step == cfg.steps:
            stats = torch.stack([loss_sum / loss_count if loss_count else torch.full((), float("nan"), device=device),
                                 torch.tensor(float(unreadable), device=device)])
            if env.distributed:
                dist.all_reduce(stats)  # SUM: gloo has no AVG
                stats[0] /= env.world_size
            now = time.perf_counter()
            last_loss = float(stats[0])
            info = {"step": step, "loss": last_loss, "lr": lr,
                    "img_per_s": images_since / max(now - t_last, 1e-9), "grad_norm": float(grad_norm),
                    "time": now - t_start, "epoch": epoch, "unreadable_images": int(stats[1]),
                    "skipped_steps": nonfinite_skipped}
            if metrics is not None:
                metrics.append(info)
                kill_point("metrics", step)
            if bar is not None:
                postfix.update(loss=f"{last_loss:.4f}", img_s=f"{info['img_per_s']:.1f}")
                bar.set_postfix(postfix)
            loss_sum.zero_()
            loss_count, images_since, t_last = 0, 0, now
        if bar is not None:
            bar.update(1)
        if step % cfg.ckpt_interval == 0 or step == cfg.steps:
            latest = save(step, epoch, index)
        if cfg.sample_interval and step % cfg.sample_interval == 0:
            ema_state = ema.full_state_dict(raw_model, env.is_main)
            _agree(env, lambda: _sample_grid(cfg, model_config, ema_state, num_classes, step, device),
                   main_only=True)
        if cfg.fid_interval and step % cfg.fid_interval == 0:
            ema_state = ema.full_state_dict(raw_model, env.is_main)
            t_fid = time.perf_counter()
            fid = _agree(env, lambda: fid_meter(_ema_model(model_config, ema_state, device)), main_only=True)
            if metrics is not None:
                info["fid"] = fid
                metrics.append({"step": step, "fid": fid, "fid_samples": cfg.fid_samples,
                                "fid_seconds": time.perf_counter() - t_fid})
            if bar is not None:
                postfix["fid"] = f"{fid:.2f}"
                bar.set_postfix(postfix)
            t_last += time.perf_counter() - t_fid  # img_per_s counts training time only
        if on_step is not None:
            on_step(step, info)
    failures = total_unreadable()
    if failures and env.is_main:
        warnings.warn(f"{failures} unreadable images were skipped during training", RuntimeWarning)
    return {"step": step, "loss": last_loss, "checkpoint": latest, "unreadable_images": failures,
            "model": raw_model if not env.distributed else None}


def _kept(latest: Optional[str]) -> str:
    return f"{latest} is left as it was" if latest else "no checkpoint was written yet"


def _any_rank_nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor, env: DistEnv) -> bool:
    """Whether the loss or gradient norm is NaN or infinite on any rank (all ranks get the same answer,
    so they skip or stop together)."""
    flag = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    if env.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _trained_params(model, repa):
    params = list(model.parameters())
    return params + list(repa.projector.parameters()) if repa is not None else params


def _average_gradients(params, world_size):
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


def _no_sync(model, cfg, env, last_micro):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if last_micro or not env.distributed:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()
