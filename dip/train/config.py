"""dip-train's settings: ``TrainConfig`` and ``load_config`` (a model name or a YAML file)."""
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import yaml


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
    repa_encoder: str = ""                  # local TorchScript encoder (dip.diffusion.load_frozen_encoder)
    repa_input_size: int = 224              # encoder input resolution; 0 = the training resolution
    repa_proj_hidden: int = 2048
    random_flip: bool = True
    num_workers: int = 4
    log_interval: int = 100
    ckpt_interval: int = 10_000
    keep_numbered_ckpts: bool = False       # also keep step_XXXXXXXX.pt at every checkpoint
    keep_last: int = 2                      # checkpoints kept (latest.pt's step included; older as step_*.pt)
    milestone_every: int = 0                # also keep every checkpoint whose step this divides; 0 = none
    async_save: bool = False                # write checkpoints on a thread from a CPU copy (dip.checkpoint)
    ckpt_minutes: float = 0.0               # also save when this many minutes passed since the last save; 0 = off
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
    stop_signals: str = "TERM,USR1"         # signals that save the run and exit 75 (dip.train.preemption); "" = none
    progress: bool = True

    def validate(self):
        _check_field_types(self)
        checks = [
            (self.image_size > 0, "image_size must be positive"),
            (self.global_batch > 0, "global_batch must be positive"),
            (self.grad_accum > 0, "grad_accum must be positive"),
            (self.steps > 0, "steps must be >= 1"),
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
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.milestone_every >= 0 and self.ckpt_minutes >= 0, "milestone_every and ckpt_minutes must be >= 0"),
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
    cfg = TrainConfig(**values).validate()
    cfg.given = frozenset(values)  # what the user set; a resumed run keeps its own values of the rest
    return cfg
