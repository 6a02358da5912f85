"""The official DiP weights on the command line: checkpoint formats, conversion, the paper's presets.

Checkpoint files are told apart by what they hold, not by their names (:func:`read_checkpoint`):

* ``dip-train``: our own checkpoint (``model_config`` + ``model``, usually ``ema``);
* ``lightning``: a PyTorch Lightning checkpoint of the official trainer (NJU-PCALab/DiP): a
  ``state_dict`` holding the EMA weights under ``ema_denoiser.`` and the raw ones under ``denoiser.``
  beside the trainer's other modules, plus Lightning's ``epoch``, ``global_step``,
  ``optimizer_states``, ``hyper_parameters``, ...;
* ``state-dict``: a plain state dict, in the official or in our parameter names, possibly under
  ``ema`` / ``model`` keys and with ``module.`` / ``_orig_mod.`` prefixes.

Official names become ours through :func:`dip.models.convert_official_state_dict` (our own names pass
through it unchanged). An official file carries no model config, so the commands take it from
``--model NAME``; weights that do not fit the named model give one line listing the first
differences and, when the weights reveal it, the config they do fit.

Reading runs no code from the file: a restricted unpickler rebuilds tensors and the plain values
torch's weights-only loader allows, and turns every other pickled object (the official classes and
Lightning's types in ``hyper_parameters``) into an inert :class:`PickledObject`, so neither Lightning
nor the official code needs to be installed. Files are memory-mapped, so a large checkpoint's
optimizer state is never read into memory.
"""
import dataclasses
import json
import math
import os
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .models import CONFIGS, DiP, DiPConfig, build_model, convert_official_state_dict, state_dict_mismatches
from .sample import GuidanceInterval, guidance_schedule

DIP_TRAIN, LIGHTNING, STATE_DICT = "dip-train", "lightning", "state-dict"
KIND_NAMES = {DIP_TRAIN: "a dip-train checkpoint", LIGHTNING: "an official DiP (Lightning) checkpoint",
              STATE_DICT: "a state dict"}
EMA_PREFIX, RAW_PREFIX = "ema_denoiser.", "denoiser."  # the official LightningModel's attribute names
LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "epoch", "optimizer_states", "loops")
# the official configs train and sample at 256x256 (configs_c2i/dip_xl.yaml: resolution 256)
OFFICIAL_IMAGE_SIZE = 256
SHOW = 3  # differences named in a one-line error


# ----------------------------------------------------------------------------- reading, safely
class PickledObject(dict):
    """Stands in for a pickled object of a class the restricted unpickler does not rebuild; keeps
    what the pickle gave it (constructor arguments, state, items) and does nothing else."""

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.pickled_args, self.pickled_state, self.pickled_items = args, None, []

    def __setstate__(self, state):
        self.pickled_state = state

    def append(self, item):
        self.pickled_items.append(item)

    def extend(self, items):
        self.pickled_items.extend(items)

    def __repr__(self):
        return f"<{type(self).__module__}.{type(self).__qualname__} (not unpickled)>"


_placeholders: Dict[Tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(name, (PickledObject,), {"__module__": module, "__qualname__": name})
    return _placeholders[key]


def _allowed_globals() -> Dict[str, Any]:
    try:  # exactly what torch.load(weights_only=True) rebuilds: tensors, storages, dtypes, containers
        from torch._weights_only_unpickler import _get_allowed_globals
        return _get_allowed_globals()
    except (ImportError, AttributeError):  # a torch without that (private) table: the essentials
        import collections
        return {"collections.OrderedDict": collections.OrderedDict,
                "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _allowed_globals().get(f"{module}.{name}")
        return allowed if allowed is not None else _placeholder(module, name)


_RESTRICTED_PICKLE = types.ModuleType("dip_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_file(path: str) -> Any:
    """What ``torch.save`` wrote to ``path`` (a file, or a run folder meaning its latest.pt), through
    the restricted unpickler, tensors memory-mapped. A file torch cannot read is a one-line ValueError."""
    path = ckpt.resolve_checkpoint(path)
    kwargs = dict(map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    try:
        try:
            return torch.load(path, mmap=True, **kwargs)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, **kwargs)  # a file in torch's legacy (pre-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{path} is not a PyTorch checkpoint file ({_first_line(err)})") from None


# ----------------------------------------------------------------------------- formats
def _is_tensor_dict(obj) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _under(state_dict: Dict[str, torch.Tensor], prefix: str) -> Optional[Dict[str, torch.Tensor]]:
    picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return picked or None


@dataclass
class Checkpoint:
    """The weights in a checkpoint file, in our parameter names. ``ema`` / ``raw``: the EMA and the
    trained weights, None where the file has none (a plain state dict's only set counts as raw).
    ``state``: the whole dict of a dip-train checkpoint (its config, step, ...), else {}."""
    path: str
    kind: str
    ema: Optional[Dict[str, torch.Tensor]]
    raw: Optional[Dict[str, torch.Tensor]]
    state: Dict[str, Any]
    details: str = ""

    @property
    def description(self) -> str:
        return KIND_NAMES[self.kind] + (f" ({self.details})" if self.details else "")

    def weights(self, raw: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
        """(state dict, "EMA" or "raw"): the EMA weights unless ``raw`` or the file has none."""
        if raw:
            if self.raw is None:
                raise ValueError(f"--raw asks for the raw weights, but {self.path} holds only EMA weights")
            return self.raw, "raw"
        return (self.ema, "EMA") if self.ema is not None else (self.raw, "raw")


def _is_dip_train(obj: Any) -> bool:
    return isinstance(obj, dict) and "model_config" in obj and _is_tensor_dict(obj.get("model"))


def classify(obj: Any, path: str) -> Checkpoint:
    """The :class:`Checkpoint` in ``obj``, a loaded file; one-line ValueError for anything else."""
    if _is_dip_train(obj):
        ema = obj.get("ema") if _is_tensor_dict(obj.get("ema")) else None
        # a converted EMA-only file stores its EMA weights as "model" too; they are not raw weights
        raw = obj["model"] if (obj.get("converted_from") or {}).get("raw", True) else None
        return Checkpoint(path, DIP_TRAIN, ema, raw, obj, f"step {obj.get('step', '?')}")
    details = ""
    if isinstance(obj, dict) and _is_tensor_dict(obj.get("state_dict")):
        state_dict = obj["state_dict"]
        kind = LIGHTNING if any(k in obj for k in LIGHTNING_KEYS) else STATE_DICT
        if kind == LIGHTNING:
            details = ", ".join(f"{k} {obj[k]}" for k in ("epoch", "global_step") if isinstance(obj.get(k), int))
    elif _is_tensor_dict(obj):
        state_dict, kind = obj, STATE_DICT
    elif isinstance(obj, dict) and (_is_tensor_dict(obj.get("ema")) or _is_tensor_dict(obj.get("model"))):
        ema, raw = (convert_official_state_dict(obj[k]) if _is_tensor_dict(obj.get(k)) else None
                    for k in ("ema", "model"))
        return Checkpoint(path, STATE_DICT, ema, raw, {})
    else:
        what = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise ValueError(f"{path} is neither a dip-train checkpoint nor official DiP weights (a Lightning "
                         f"checkpoint with a state_dict, or a state dict of tensors): it holds {what}")
    ema, raw = _under(state_dict, EMA_PREFIX), _under(state_dict, RAW_PREFIX)
    if ema is None and raw is None:
        raw = state_dict
    return Checkpoint(path, kind, ema and convert_official_state_dict(ema), raw and convert_official_state_dict(raw),
                      {}, details)


def read_checkpoint(path: str) -> Checkpoint:
    """The weights of a dip-train checkpoint, an official Lightning checkpoint or a state dict."""
    path = ckpt.resolve_checkpoint(path)
    obj = load_file(path)
    if _is_dip_train(obj):  # our own format: tensors and plain values only, and its checksum verified
        obj = ckpt.load_checkpoint(path)
    return classify(obj, path)


# ----------------------------------------------------------------------------- checks
def check_finite(state_dict: Dict[str, torch.Tensor], path: str, which: str, refusing: str):
    bad = ckpt.nonfinite_tensors(state_dict)
    if bad:
        raise ValueError(f"{path}: the {which} weights hold NaN or infinite values ({len(bad)} tensors, first "
                         f"{', '.join(bad[:SHOW])}); refusing to {refusing}")


def named_config(name: str, **overrides) -> DiPConfig:
    """The DiPConfig of a CONFIGS name (one-line ValueError for an unknown one)."""
    with torch.device("meta"):
        return build_model(name, **overrides).config


def _own_state_dict(config: DiPConfig) -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        return DiP(config).state_dict()


def infer_config(state_dict: Dict[str, torch.Tensor]) -> Optional[DiPConfig]:
    """The DiPConfig whose model these weights (our names) fit exactly, read off their shapes, or None."""
    heads = {"head.enc1.weight": "patch_detailer", "head.linear.weight": "none", "head.fc1.weight": "mlp",
             "head.cond.weight": "coord_mlp", "head.pos_embed": "attention"}
    try:
        embed = state_dict["x_embedder.weight"]
        hidden, patch_dim = embed.shape
        channels = state_dict["head.out.weight"].shape[0] if "head.out.weight" in state_dict else 3
        config = DiPConfig(
            hidden_size=int(hidden),
            depth=1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")),
            num_heads=int(hidden) // int(state_dict["blocks.0.attn.q_norm.weight"].shape[0]),
            patch_size=math.isqrt(int(patch_dim) // int(channels)),
            num_classes=int(state_dict["y_embedder.weight"].shape[0]) - 1,
            in_channels=int(channels),
            head=next(h for k, h in heads.items() if k in state_dict))
        own = _own_state_dict(config)
    except (KeyError, ValueError, StopIteration, ZeroDivisionError):
        return None
    return config if not any(state_dict_mismatches(own, state_dict)) else None


def describe_config(config: DiPConfig) -> str:
    name = next((n for n in CONFIGS if named_config(n) == config), None)
    fields = ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))
    return f"{name} ({fields})" if name else fields


def check_fit(config: DiPConfig, state_dict: Dict[str, torch.Tensor], path: str, model_label: str):
    """One-line ValueError naming the first differences when ``state_dict`` does not fit ``config``."""
    missing, unexpected, shapes = state_dict_mismatches(_own_state_dict(config), state_dict)
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(items)} {what} (first {'; '.join(items[:SHOW])})"
             for what, items in (("of another shape", shapes), ("missing", missing), ("unexpected", unexpected))
             if items]
    fits = infer_config(state_dict)
    hint = f"; they fit {describe_config(fits)}" if fits is not None else ""
    raise ValueError(f"{path}: the weights do not fit {model_label}: {', '.join(parts)}{hint}")


# ----------------------------------------------------------------------------- models
def model_config_for(checkpoint: Checkpoint, model_name: Optional[str] = None) -> DiPConfig:
    """The config a checkpoint's weights are for: a dip-train checkpoint's own (``model_name``, when
    given, must agree with it), else ``model_name``'s (required)."""
    if checkpoint.kind == DIP_TRAIN:
        own = DiPConfig(**checkpoint.state["model_config"])
        if model_name is not None and named_config(model_name, num_classes=own.num_classes) != own:
            raise ValueError(f"--model {model_name} is not the model of {checkpoint.path}, a dip-train checkpoint "
                             f"of {describe_config(own)}; leave --model out")
        return own
    if model_name is None:
        raise ValueError(f"{checkpoint.path} is {checkpoint.description}, which does not say its model: "
                         f"name it with --model (one of {', '.join(CONFIGS)}), e.g. --model DiP-XL/16")
    return named_config(model_name)


def load_model(path: str, model_name: Optional[str] = None, raw: bool = False, device="cpu"):
    """(model in eval mode, checkpoint dict in dip-train layout, Checkpoint) from any checkpoint
    :func:`read_checkpoint` knows; the EMA weights unless ``raw``. For an official file the dict
    holds what dip-sample needs (config with image_size and objective, num_classes)."""
    checkpoint = read_checkpoint(path)
    config = model_config_for(checkpoint, model_name)
    state_dict, which = checkpoint.weights(raw)
    if checkpoint.kind == DIP_TRAIN:
        state = checkpoint.state
        return ckpt.model_from_state(state, checkpoint.path, use_ema=not raw, device=device), state, checkpoint
    check_fit(config, state_dict, checkpoint.path, f"--model {model_name}")
    check_finite(state_dict, checkpoint.path, which, "sample from them")
    model = DiP(config)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), converted_state(checkpoint, config, model_name), checkpoint


def converted_state(checkpoint: Checkpoint, config: DiPConfig, model_name: Optional[str] = None,
                    image_size: int = OFFICIAL_IMAGE_SIZE) -> Dict[str, Any]:
    """An official checkpoint as a dip-train checkpoint dict: ``model`` the raw weights (the EMA
    when the file has no others), ``ema`` the EMA weights or None, step 0, and of the training config
    only what is known (model, image size, objective: the official code trains flow matching)."""
    return {
        "model": checkpoint.raw if checkpoint.raw is not None else checkpoint.ema,
        "ema": checkpoint.ema,
        "model_config": dataclasses.asdict(config),
        "config": {"model": model_name, "image_size": image_size, "objective": "flow"},
        "num_classes": config.num_classes,
        "step": 0,
        "converted_from": {"path": os.path.abspath(checkpoint.path), "format": checkpoint.kind,
                           "details": checkpoint.details, "ema": checkpoint.ema is not None,
                           "raw": checkpoint.raw is not None},
    }


def convert(src: str, dst: str, model_name: str, image_size: int = OFFICIAL_IMAGE_SIZE,
            overwrite: bool = False) -> Tuple[Dict[str, Any], Checkpoint]:
    """Write official weights at ``src`` as a dip-train checkpoint at ``dst`` (atomically), which
    dip-sample then loads with no flags and dip-train accepts with --init-from. Refuses an existing
    ``dst`` unless ``overwrite``, and weights holding NaN or inf. Returns (the dict written, source)."""
    if os.path.isdir(dst):
        raise IsADirectoryError(f"{dst} is a folder; name the checkpoint file to write")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    checkpoint = read_checkpoint(src)
    if checkpoint.kind == DIP_TRAIN:
        raise ValueError(f"{checkpoint.path} is already a dip-train checkpoint; use it as it is")
    config = named_config(model_name)
    for which, weights in (("EMA", checkpoint.ema), ("raw", checkpoint.raw)):
        if weights is not None:
            check_fit(config, weights, checkpoint.path, f"--model {model_name}")
            check_finite(weights, checkpoint.path, which, "convert them")
    state = converted_state(checkpoint, config, model_name, image_size)
    ckpt.write_checkpoint(state, dst)
    return state, checkpoint


@dataclass
class InitWeights:
    """Weights a new training run starts from (dip-train --init-from)."""
    path: str
    model: Dict[str, torch.Tensor]
    ema: Optional[Dict[str, torch.Tensor]]
    num_classes: int
    description: str

    def load_into(self, model: torch.nn.Module, model_label: str):
        """Load the weights into ``model`` (before any wrapping), after the fit and finiteness checks."""
        for which, weights in (("raw", self.model), ("EMA", self.ema)):
            if weights is not None:
                check_fit(model.config, weights, self.path, model_label)
                check_finite(weights, self.path, which, "train from them")
        model.load_state_dict(self.model)


def read_init_weights(path: str) -> InitWeights:
    """The weights of a dip-train checkpoint or official file for --init-from: the model from the
    raw weights (the EMA ones when there are none), the EMA from the EMA weights when present."""
    checkpoint = read_checkpoint(path)
    model = checkpoint.raw if checkpoint.raw is not None else checkpoint.ema
    if "y_embedder.weight" not in model:
        raise ValueError(f"{checkpoint.path}: the weights have no y_embedder.weight, so they are not DiP weights")
    return InitWeights(checkpoint.path, model, checkpoint.ema, int(model["y_embedder.weight"].shape[0]) - 1,
                       checkpoint.description)


# ----------------------------------------------------------------------------- presets
# The official code is NJU-PCALab/DiP at commit 949294f290f2380a7767649f343679e24dab4410 (read
# through the project's code index); the paper is arXiv 2511.18822v3.
OFFICIAL_CODE = "NJU-PCALab/DiP@949294f"
PAPER = "arXiv 2511.18822v3"
PAPER_CFG = f"{PAPER} Appendix C, \"Classifier-Free Guidance\""


@dataclass(frozen=True)
class SamplingPreset:
    """Sampling settings under one name; ``sources`` says where each value comes from."""
    name: str
    purpose: str
    method: str
    steps: int
    cfg_scale: float
    guidance_interval: GuidanceInterval
    per_class: int
    image_size: int
    sources: Dict[str, str]

    def guided_steps(self) -> List[int]:
        """Indices i of the Euler steps (starting at t = i/steps) that run both branches."""
        schedule = guidance_schedule(self.steps, self.cfg_scale, self.guidance_interval)
        return [i for i in range(self.steps) if schedule[i]]

    def model_evaluations_per_image(self) -> int:
        """Image-forwards one sample costs: 2 at each guided step (conditional + null class in one
        batch), 1 at the others (the conditional branch alone)."""
        return self.steps + len(self.guided_steps())

    def official_sampler_evaluations_per_image(self) -> int:
        """Image-forwards the official EulerSampler spends on these settings: it runs the conditional
        and the unconditional half at every step, guided or not."""
        return 2 * self.steps

    def summary(self) -> str:
        guided = self.guided_steps()
        steps_text = (f"steps {guided[0]}..{guided[-1]} guided ({len(guided)} of {self.steps})" if guided
                      else "no step guided")
        return (f"{self.method}, {self.steps} steps, cfg scale {self.cfg_scale}, guidance for t in "
                f"{self.guidance_interval}: {steps_text}, {self.model_evaluations_per_image()} image-forwards per "
                f"image, {self.per_class} per class, {self.image_size}x{self.image_size}")


_FID_SAMPLES = (f"{OFFICIAL_CODE} configs_c2i/dip_xl.yaml: pred_dataset max_num_instances 50000 over num_classes "
                "1000 (50 per class, the ADM 50k-sample FID; the official README: \"We use the ADM evaluation "
                "suite to report FID on ImageNet\")")
_RESOLUTION = f"{OFFICIAL_CODE} configs_c2i/dip_xl.yaml: resolution 256, latent_shape [3, 256, 256]"
_OFFICIAL_GRID = (f"{OFFICIAL_CODE} src/diffusion/flow_matching/sampling.py EulerSampler: the grid "
                  "linspace(0, 0.99, 100) then 1.0, i.e. t_i = i/100, which is dip.sample.flow_time_grid(100)")

PRESETS = {
    "paper-256": SamplingPreset(
        name="paper-256",
        purpose="the sampler behind the paper's ImageNet 256 FIDs (Table 1: 2.16, 1.98, 1.79)",
        method="euler",
        steps=100,
        cfg_scale=2.9,
        guidance_interval=GuidanceInterval(0.11, 0.97, include_lo=True, include_hi=True),
        per_class=50,
        image_size=256,
        sources={
            "method": f"{PAPER_CFG}: a 100-step Euler sampler, the sampler of Table 1; the step is the official "
                      f"ode_step_fn (x + v dt) on {_OFFICIAL_GRID}",
            "steps": f"{PAPER_CFG}: 100 Euler steps (Table 1's 1.98 at 320 epochs uses 75)",
            "cfg_scale": f"{PAPER_CFG}: interval-based guidance with scale 2.9",
            "guidance_interval": f"{PAPER_CFG}: guidance only for normalized times in [0.11, 0.97]. Normalized "
                                 "time is the model's t (0 noise, 1 data, the convention of the official code "
                                 "and ours); a step is guided when its start time t_i = i/100, where Euler "
                                 "evaluates the model, lies in the closed interval: steps 11..97",
            "per_class": _FID_SAMPLES,
            "image_size": _RESOLUTION,
        },
    ),
    "official-config": SamplingPreset(
        name="official-config",
        purpose=f"the sampling settings of the released code's configs_c2i/dip_xl.yaml ({OFFICIAL_CODE})",
        method="euler",
        steps=100,
        cfg_scale=1.0,
        guidance_interval=GuidanceInterval(0.1, 1.0, include_lo=False, include_hi=False),
        per_class=50,
        image_size=256,
        sources={
            "method": f"{OFFICIAL_CODE} configs_c2i/dip_xl.yaml: diffusion_sampler EulerSampler with step_fn "
                      f"ode_step_fn and timeshift 1, on {_OFFICIAL_GRID}",
            "steps": f"{OFFICIAL_CODE} configs_c2i/dip_xl.yaml: diffusion_sampler num_steps 100",
            "cfg_scale": f"{OFFICIAL_CODE} configs_c2i/dip_xl.yaml: diffusion_sampler guidance 1.0, i.e. the "
                         "conditional prediction (configs_c2i/dip_large.yaml has 3.5)",
            "guidance_interval": f"{OFFICIAL_CODE} configs_c2i/dip_xl.yaml: guidance_interval_min 0.1, "
                                 "guidance_interval_max 1.0; src/diffusion/flow_matching/sampling.py EulerSampler "
                                 "guides while min < t < max, both ends excluded",
            "per_class": _FID_SAMPLES,
            "image_size": _RESOLUTION,
        },
    ),
}


SETTINGS = ("method", "steps", "cfg_scale", "guidance_interval", "per_class", "image_size")  # what a preset sets


def apply_preset(args, defaults: Dict[str, Any]) -> Optional[SamplingPreset]:
    """Fill the sampling settings of ``args`` (argparse values) that the user left None: from the
    preset ``args.preset`` names, else from ``defaults`` (None where that has no entry either).
    Flags given explicitly always win. Returns the preset, or None."""
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else None
    for name in SETTINGS + tuple(n for n in defaults if n not in SETTINGS):
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(preset, name) if preset is not None else defaults.get(name))
    return preset


# ----------------------------------------------------------------------------- time estimate
ANCHORS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "anchors.json")


def load_anchors(path: str = ANCHORS_FILE) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def sampling_time_estimate(preset: SamplingPreset, anchors: Dict[str, Any], num_classes: int = 1000) -> Dict[str, Any]:
    """Seconds to draw ``preset.per_class * num_classes`` images on the anchors' GPU: at the measured
    throughput of a batch-64 forward (dip-sample's default --batch-size 32 runs 64 images per
    guided forward) and, as a floor no implementation can beat, at the card's bf16 matmul ceiling."""
    xl = anchors["dipxl16_256"]
    images = preset.per_class * num_classes
    forwards = preset.model_evaluations_per_image()
    per_forward_s = xl["forward_batch64_ms"]["eager"] / 1000.0 / 64
    return {
        "images": images,
        "forwards_per_image": forwards,
        "guided_steps": len(preset.guided_steps()),
        "per_forward_ms": per_forward_s * 1000.0,
        "seconds": images * forwards * per_forward_s,
        "floor_seconds": images * forwards * xl["gflop_per_image_forward"] / (anchors["bf16_matmul_tflops"] * 1000.0),
    }


def estimate_markdown(anchors_path: str = ANCHORS_FILE, preset_name: str = "paper-256") -> str:
    """The README's time estimate for the paper's FID run, generated from bench/anchors.json."""
    anchors = load_anchors(anchors_path)
    preset = PRESETS[preset_name]
    e = sampling_time_estimate(preset, anchors)
    official = PRESETS["official-config"]
    o = sampling_time_estimate(official, anchors)
    xl = anchors["dipxl16_256"]
    return (
        f"**Expected time, an estimate from reference measurements, not a run of this package:** about "
        f"**{e['seconds'] / 3600:.1f} hours** on one {anchors['gpu']} for the {e['images']:,} images of "
        f"`--preset {preset.name}` (about {e['seconds'] / 3600 / 8:.1f} hours on 8, which share the batches "
        f"evenly). How: each image costs {e['forwards_per_image']} image-forwards ({e['guided_steps']} guided "
        f"steps x 2 + {preset.steps - e['guided_steps']} unguided steps x 1; the official sampler spends "
        f"{preset.official_sampler_evaluations_per_image()}, as it runs the unconditional half at every step); "
        f"one image-forward takes {e['per_forward_ms']:.2f} ms in a batch of 64 (dip-sample's default "
        f"`--batch-size 32` guides 64 at a time), from a {xl['forward_batch64_ms']['eager']} ms batch-64 forward "
        f"of {anchors['implementation']} ({anchors['gpu']}, bf16, {anchors['date']}); this package's kernels "
        f"have not been timed on a GPU yet. At the card's bf16 matmul ceiling ({anchors['bf16_matmul_tflops']} "
        f"TFLOP/s, {xl['gflop_per_image_forward']} GFLOP per image-forward) the images would take "
        f"{e['floor_seconds'] / 3600:.1f} hours, a floor no implementation can beat. An H100 SXM has the same "
        f"bf16 tensor-core peak, so expect about the same there. `--preset {official.name}` ("
        f"{o['guided_steps'] or 'no'} guided steps, {o['forwards_per_image']} image-forwards per image) takes "
        f"about {o['seconds'] / 3600:.1f} hours. "
        f"Converting the checkpoint and dip-eval's Inception pass are not included. "
        f"`python -m dip.docs` regenerates this paragraph from bench/anchors.json.")


def presets_markdown(anchors_path: str = ANCHORS_FILE) -> str:
    """docs/sampling.md's table of the presets, side by side, with where each value comes from."""
    anchors = load_anchors(anchors_path)
    presets = list(PRESETS.values())

    def guided_text(preset):
        guided = preset.guided_steps()
        return f"{guided[0]}..{guided[-1]} ({len(guided)} of {preset.steps})" if guided else "none"

    rows = [
        ("for", lambda p: p.purpose),
        ("solver", lambda p: f"{p.method}, {p.steps} steps, t_i = i/{p.steps}"),
        ("guidance scale", lambda p: f"{p.cfg_scale}" + (" (no guidance)" if p.cfg_scale == 1.0 else "")),
        ("guidance interval, model time t", lambda p: f"{p.guidance_interval}"),
        ("guided steps i", guided_text),
        ("image-forwards per image, this package", lambda p: f"{p.model_evaluations_per_image()}"),
        ("image-forwards per image, the official sampler", lambda p: f"{p.official_sampler_evaluations_per_image()}"),
        ("images", lambda p: f"{p.per_class * 1000:,} ({p.per_class} per class), {p.image_size}x{p.image_size}"),
        (f"estimated time on one {anchors['gpu']} (see the README)",
         lambda p: f"{sampling_time_estimate(p, anchors)['seconds'] / 3600:.1f} hours"),
    ]
    lines = ["| | " + " | ".join(f"`{p.name}`" for p in presets) + " |", "|---" * (len(presets) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(value(p) for p in presets) + " |" for label, value in rows]
    paper = PRESETS["paper-256"]
    strict = dataclasses.replace(paper, guidance_interval=dataclasses.replace(
        paper.guidance_interval, include_lo=False, include_hi=False))
    lines += ["", f"The official sampler's strict rule (both ends excluded) on the paper's ends "
                  f"{strict.guidance_interval} would guide steps {guided_text(strict)} instead.", "",
              "Where each value comes from:", ""]
    lines += [f"- `{p.name}` {name}: {p.sources[name]}" for p in presets for name in SETTINGS]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    outputs = {"--estimate": estimate_markdown, "--presets": presets_markdown}
    if len(argv) == 1 and argv[0] in outputs:
        print(outputs[argv[0]]())
        return 0
    print("usage: python -m dip.official --estimate | --presets   (the README's time estimate | the preset "
          "table of docs/sampling.md)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
