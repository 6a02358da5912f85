"""Samplers for DiP: Euler and Heun ODE solvers for the flow-matching (velocity) model, DDIM and
ancestral DDPM for the noise-prediction model, classifier-free guidance, seeded sampling and
image / .npz output.

Time runs from t = 0 (noise) to t = 1 (data), the model's convention (see dip.diffusion) and the
official DiP code's; the paper's "normalized time" is this t. Guidance combines
v = v_uncond + scale * (v_cond - v_uncond) at the model evaluations whose time lies in the guidance
interval (:class:`GuidanceInterval`; a plain pair (lo, hi) means lo < t <= hi), the plain conditional
prediction elsewhere. Which evaluations are guided is decided per step INDEX, in exact rational
arithmetic (:func:`guidance_schedule`): step i of an n-step flow grid starts at t = i/n exactly and
the interval's ends are the decimals they print as, so no float rounding of the grid can move an
edge step in or out. The decision is made on the host before the loop, so no sampler step reads a
device value back, and a CUDA-graph sampler can capture one graph per branch.
"""
import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

import torch.distributed as dist

from .checkpoint import atomic_write
from .diffusion import DDPM, null_class_id
from .distributed import DistEnv

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but progress bars are optional
    tqdm = None

METHODS = ("euler", "heun", "ddim", "ddpm")


@functools.lru_cache(maxsize=None)
def _exact_decimal(value: float) -> Fraction:
    # the shortest decimal that reads back as ``value``: what the user wrote (0.11 -> 11/100)
    return Fraction(repr(value))


@dataclass(frozen=True)
class GuidanceInterval:
    """The model times t (0 noise, 1 data) at which classifier-free guidance is on: from ``lo`` to
    ``hi``, each end included or not. ``lo`` and ``hi`` count as the decimals they print as (0.11 is
    11/100 exactly), so that membership is decided in exact arithmetic."""
    lo: float
    hi: float
    include_lo: bool = False
    include_hi: bool = True

    def __post_init__(self):
        ends = (self.lo, self.hi)
        # ends outside [0, 1] are fine: (-1, 1] guides every step
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in ends) \
                or not self.lo <= self.hi:
            raise ValueError(f"guidance_interval must be two finite numbers lo <= hi, got {ends!r}")
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))

    def contains(self, t: Rational) -> bool:
        """Whether the exact time ``t`` (a Fraction or an int) lies in the interval."""
        lo, hi = _exact_decimal(self.lo), _exact_decimal(self.hi)
        return (lo <= t if self.include_lo else lo < t) and (t <= hi if self.include_hi else t < hi)

    def __str__(self) -> str:
        return f"{'[' if self.include_lo else '('}{self.lo}, {self.hi}{']' if self.include_hi else ')'}"


IntervalLike = Union[GuidanceInterval, Tuple[float, float]]


def as_guidance_interval(interval: IntervalLike) -> GuidanceInterval:
    """``interval`` as a GuidanceInterval: one passes through; a pair (lo, hi) of numbers is
    lo < t <= hi, the rule of ``--guidance-interval LO,HI``. ValueError for anything else."""
    if isinstance(interval, GuidanceInterval):
        return interval
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise ValueError(f"guidance_interval must be a GuidanceInterval or a pair (lo, hi), got {interval!r}")
    return GuidanceInterval(*interval)


def parse_guidance_interval(text: str) -> GuidanceInterval:
    """A guidance interval as written on a command line: ``LO,HI`` (lo < t <= hi, as a pair), or with
    its ends marked, ``[LO,HI]``, ``(LO,HI)``, ``[LO,HI)``, ``(LO,HI]``. ValueError for anything else."""
    body = text.strip()
    marked = body[:1] in "[(" and body[-1:] in "])" and len(body) >= 2
    inner = body[1:-1] if marked else body
    parts = inner.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"guidance interval must be LO,HI or one of [LO,HI], (LO,HI), [LO,HI), (LO,HI], "
                         f"got {text!r}") from None
    if not marked:
        return GuidanceInterval(lo, hi)
    return GuidanceInterval(lo, hi, include_lo=body[0] == "[", include_hi=body[-1] == "]")


def guidance_active(t: Rational, cfg_scale: float, interval: IntervalLike) -> bool:
    """True when a model evaluation at the exact time ``t`` (a Fraction or an int, never a float)
    runs both branches: scale != 1 and t in the interval."""
    if not isinstance(t, Rational):
        raise TypeError(f"t must be an exact time (a Fraction), got {type(t).__name__} {t!r}")
    return cfg_scale != 1.0 and as_guidance_interval(interval).contains(t)


def guidance_schedule(steps: int, cfg_scale: float, interval: IntervalLike) -> List[bool]:
    """Whether the model evaluation at each point i = 0..steps of ``flow_time_grid(steps)`` is
    guided, decided at its exact time i/steps. Euler's step i evaluates at point i; Heun's also at
    point i + 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    interval = as_guidance_interval(interval)
    return [guidance_active(Fraction(i, steps), cfg_scale, interval) for i in range(steps + 1)]


def cfg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond), float32, for any prediction that is linear in the score
    (velocity or noise)."""
    pred_uncond = pred_uncond.float()
    return pred_uncond + cfg_scale * (pred_cond.float() - pred_uncond)


def guided_velocity(model: nn.Module, x: torch.Tensor, t: float, y: torch.Tensor, cfg_scale: float,
                    guided: bool, null_id: Optional[int] = None) -> torch.Tensor:
    """The model's (guided) prediction at one time step.

    x (B, C, H, W); t a host float in [0, 1] (the same time for the whole batch); y (B,) int64;
    ``guided``: the step's entry of :func:`guidance_schedule`. A guided step runs the conditional and
    null-class branches as ONE batch of 2B (conditional first); any other step only the conditional
    batch of B. Works for any linear prediction (velocity for flow matching, eps for DDPM).
    Returns float32 (B, C, H, W)."""
    b = x.shape[0]
    if guided:
        if null_id is None:
            null_id = null_class_id(model)
        x_in = torch.cat([x, x], 0)
        y_in = torch.cat([y, torch.full_like(y, null_id)], 0)
        t_in = torch.full((2 * b,), t, device=x.device, dtype=torch.float32)
        pred_cond, pred_uncond = model(x_in, t_in, y_in).chunk(2, 0)
        return cfg_combine(pred_cond, pred_uncond, cfg_scale)
    t_in = torch.full((b,), t, device=x.device, dtype=torch.float32)
    return model(x, t_in, y).float()


def flow_time_grid(steps: int) -> list:
    """Uniform grid of steps + 1 host floats from 0 to exactly 1: [0, 1/steps, ..., 1], point i the
    double nearest i/steps. For 100 steps it is the official sampler's grid, linspace(0, 0.99, 100)
    then 1.0 (which that code builds in float32)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [i / steps for i in range(steps)] + [1.0]


def _progress(iterable, enabled: bool, desc: str):
    if enabled and tqdm is not None:
        return tqdm(iterable, desc=desc, leave=False)
    return iterable


def _check(noise: torch.Tensor, y: torch.Tensor):
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating (B, C, H, W) tensor, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (noise.shape[0],):
        raise ValueError(f"y must be a ({noise.shape[0]},) tensor of class ids")


@torch.no_grad()
def euler_sample(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int = 100, cfg_scale: float = 1.0,
                 guidance_interval: IntervalLike = (0.1, 1.0), generator: Optional[torch.Generator] = None,
                 progress: bool = False) -> torch.Tensor:
    """Euler ODE solve of dx/dt = v(x, t) from t = 0 (``noise``, (B, C, H, W)) to t = 1 on the uniform
    grid of ``flow_time_grid(steps)`` (the last step lands exactly on t = 1): ``steps`` model
    evaluations. ``generator`` is unused (deterministic) and accepted for a uniform signature.
    Returns float32 (B, C, H, W), not clamped."""
    _check(noise, y)
    grid = flow_time_grid(steps)
    guided = guidance_schedule(steps, cfg_scale, guidance_interval)
    null_id = null_class_id(model) if any(guided) else None
    x = noise.float()
    for i in _progress(range(steps), progress, "euler"):
        t0, t1 = grid[i], grid[i + 1]
        v = guided_velocity(model, x.to(noise.dtype), t0, y, cfg_scale, guided[i], null_id)
        x = x + (t1 - t0) * v
    return x


@torch.no_grad()
def heun_sample(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int = 50, cfg_scale: float = 1.0,
                guidance_interval: IntervalLike = (0.1, 1.0), generator: Optional[torch.Generator] = None,
                progress: bool = False) -> torch.Tensor:
    """Heun (2nd-order) ODE solve on the same grid as ``euler_sample``; the last step (ending at
    t = 1) is a plain Euler step, as in the official sampler, so it costs 2 * steps - 1 model
    evaluations. Guidance is decided per evaluation from that evaluation's own time.
    Returns float32 (B, C, H, W), not clamped."""
    _check(noise, y)
    grid = flow_time_grid(steps)
    guided = guidance_schedule(steps, cfg_scale, guidance_interval)
    null_id = null_class_id(model) if any(guided) else None
    x = noise.float()
    for i in _progress(range(steps), progress, "heun"):
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        v0 = guided_velocity(model, x.to(noise.dtype), t0, y, cfg_scale, guided[i], null_id)
        x_pred = x + dt * v0
        if i == steps - 1:
            x = x_pred
        else:
            v1 = guided_velocity(model, x_pred.to(noise.dtype), t1, y, cfg_scale, guided[i + 1], null_id)
            x = x + dt * 0.5 * (v0 + v1)
    return x


def ddim_steps(num_train_steps: int, steps: int) -> list:
    """Descending discrete steps used by DDIM/DDPM sampling: ``steps`` values spread evenly over
    [0, num_train_steps), starting at num_train_steps - 1 and ending at 0."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {steps}")
    if steps == 1:
        return [num_train_steps - 1]
    ks = np.round(np.linspace(num_train_steps - 1, 0, steps)).astype(np.int64)
    return sorted(set(int(k) for k in ks), reverse=True)


@torch.no_grad()
def _eps_sampler(model, noise, y, steps, cfg_scale, guidance_interval, generator, progress, schedule, eta,
                 clip_denoised, desc):
    _check(noise, y)
    schedule = schedule or DDPM()
    abar = schedule.alphas_cumprod.tolist()  # host floats: no device reads inside the loop
    ks = ddim_steps(schedule.num_steps, steps)
    # model time t = 1 - k / num_steps, exactly
    guided = [guidance_active(Fraction(schedule.num_steps - k, schedule.num_steps), cfg_scale, guidance_interval)
              for k in ks]
    null_id = null_class_id(model) if any(guided) else None
    x = noise.float()
    for i in _progress(range(len(ks)), progress, desc):
        k = ks[i]
        a_t = abar[k]
        a_prev = abar[ks[i + 1]] if i + 1 < len(ks) else 1.0
        t = 1.0 - k / schedule.num_steps
        eps = guided_velocity(model, x.to(noise.dtype), t, y, cfg_scale, guided[i], null_id)
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
        # eta = 1 gives the DDPM posterior q(x_prev | x_t, x0) of the (respaced) chain
        sigma = eta * math.sqrt(max((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev), 0.0))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0.0 and i + 1 < len(ks):
            device = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
            x = x + sigma * z
    return x


def ddim_sample(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int = 50, cfg_scale: float = 1.0,
                guidance_interval: IntervalLike = (0.1, 1.0), generator: Optional[torch.Generator] = None,
                progress: bool = False, schedule: Optional[DDPM] = None, eta: float = 0.0,
                clip_denoised: bool = True) -> torch.Tensor:
    """DDIM (Song et al.) for an eps-predicting model trained with ``schedule`` (default DDPM()).
    ``steps`` evaluations on ``ddim_steps``; model time t = 1 - k / num_steps; eta = 0 is
    deterministic, eta > 0 draws noise from ``generator``. noise (B, C, H, W) ~ N(0, I).
    Returns float32 (B, C, H, W) (the final x0 estimate, in [-1, 1] when clip_denoised)."""
    return _eps_sampler(model, noise, y, steps, cfg_scale, guidance_interval, generator, progress, schedule, eta,
                        clip_denoised, "ddim")


def ddpm_sample(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int = 1000, cfg_scale: float = 1.0,
                guidance_interval: IntervalLike = (0.1, 1.0), generator: Optional[torch.Generator] = None,
                progress: bool = False, schedule: Optional[DDPM] = None,
                clip_denoised: bool = True) -> torch.Tensor:
    """Ancestral DDPM sampling (posterior variance of Ho et al.), respaced to ``steps`` evaluations
    when steps < num_steps; stochastic, driven by ``generator``. Returns float32 (B, C, H, W)."""
    return _eps_sampler(model, noise, y, steps, cfg_scale, guidance_interval, generator, progress, schedule, 1.0,
                        clip_denoised, "ddpm")


_SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "ddim": ddim_sample, "ddpm": ddpm_sample}
PRECISIONS = ("auto", "bf16", "fp32")


def precision_autocast_dtype(precision: str, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype of a sampling precision: "auto" is bf16 autocast on CUDA, as in training
    (the kernels' fast path; fp32 runs the slower fp32 kernels), and plain fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def sample(model: nn.Module, labels: Union[Sequence[int], torch.Tensor], image_size: Union[int, Tuple[int, int]],
           steps: int = 100, cfg_scale: float = 1.0, seed: int = 0, method: str = "euler",
           device: Union[str, torch.device, None] = None, progress: bool = True,
           guidance_interval: IntervalLike = (0.1, 1.0), channels: int = 3,
           schedule: Optional[DDPM] = None, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Class-conditional images from ``model``, reproducibly.

    labels: B class ids; image_size: S or (H, W); method: "euler" | "heun" (velocity models) or
    "ddim" | "ddpm" (eps models, with ``schedule``). The starting noise is drawn from a CPU
    torch.Generator seeded with ``seed`` (the same on every device); the stochastic DDPM steps use a
    generator on ``device`` seeded with seed + 1. Same seed, same images (on the same device).
    The model runs in eval mode for the call (its previous mode is restored) and without autograd;
    ``autocast_dtype`` (e.g. torch.bfloat16) runs it under torch.autocast, while the solver state
    stays float32. Returns float32 (B, channels, H, W) on ``device``, clamped to [-1, 1]."""
    if method not in _SAMPLERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).to(device)
    if y.numel() == 0:
        raise ValueError("labels must hold at least one class id")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    noise_gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((y.shape[0], channels, h, w), generator=noise_gen, dtype=torch.float32).to(device)
    step_gen = torch.Generator(device=device).manual_seed(int(seed) + 1)
    kwargs = dict(steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval, generator=step_gen,
                  progress=progress)
    if method in ("ddim", "ddpm"):
        kwargs["schedule"] = schedule
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with autocast:
            images = _SAMPLERS[method](model, noise, y, **kwargs)
    finally:
        model.train(was_training)
    return images.clamp(-1.0, 1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) tensor in [-1, 1] -> uint8 (B, H, W, C) numpy, value = round((x + 1) * 127.5)
    clamped to [0, 255]. NaN / infinite values become 0 (black), with a warning naming how many
    images hold them."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a (B, C, H, W) tensor in [-1, 1]")
    bad = int((~torch.isfinite(images.detach())).flatten(1).any(1).sum())
    if bad:
        warnings.warn(f"{bad} of {images.shape[0]} sampled images hold NaN or infinite values; "
                      "NaN pixels are written black, infinite ones saturated", RuntimeWarning)
        images = torch.nan_to_num(images.detach(), nan=-1.0, posinf=1.0, neginf=-1.0)
    x = ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: Union[torch.Tensor, np.ndarray], nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles images ((B, C, H, W) tensor in [-1, 1], or uint8 (B, H, W, C) numpy) into one uint8
    (rows * (H + padding) + padding, nrow * (W + padding) + padding, C) array, ``nrow`` per row."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError("images must be a (B, C, H, W) tensor or a uint8 (B, H, W, C) array")
    b, h, w, c = arr.shape
    ncol = max(1, min(nrow, b))
    nrows = math.ceil(b / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def grid_format(path: str) -> str:
    """The image format ``path``'s extension asks for (PNG or JPEG); ValueError for any other."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in GRID_FORMATS:
        raise ValueError(f"cannot write an image grid as {path!r}: the name must end in "
                         f"{', '.join(GRID_FORMATS)}")
    return GRID_FORMATS[ext]


def save_grid(images: Union[torch.Tensor, np.ndarray], path: str, nrow: int = 8, padding: int = 2) -> str:
    """Saves ``make_grid(images, nrow, padding)`` at ``path`` as PNG or JPEG (by its extension,
    see grid_format; parent folders created, written atomically); returns the path."""
    from PIL import Image

    image_format = grid_format(path)
    grid = make_grid(images, nrow, padding)
    with atomic_write(path, "wb") as f:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
            f, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return path


def save_npz(path: str, images_uint8: np.ndarray, labels: Optional[Union[np.ndarray, Sequence[int]]] = None) -> str:
    """Writes samples in the ADM evaluation-suite format: ``arr_0`` uint8 (N, H, W, 3) and, when given,
    ``arr_1`` int64 (N,) labels. Returns the file path (np.savez appends .npz if missing)."""
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"images_uint8 must be uint8 (N, H, W, 3), got {images_uint8.dtype} {images_uint8.shape}")
    arrays = [images_uint8]
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != images_uint8.shape[0]:
            raise ValueError(f"labels must have {images_uint8.shape[0]} entries, got {labels.shape[0]}")
        arrays.append(labels)
    path = path if path.endswith(".npz") else path + ".npz"
    with atomic_write(path, "wb") as f:
        np.savez(f, *arrays)
    return path


# ----------------------------------------------------------------------------- many images, many processes
def class_batches(num_classes: int, per_class: int, batch_size: int) -> List[np.ndarray]:
    """The labels of ``per_class`` images of every class, cut into batches of ``batch_size``."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]


def sample_npz(draw: Callable[[List[int], int], torch.Tensor], path: str, batches: List[np.ndarray], seed: int,
               image_size: int, env: DistEnv, progress: bool = False) -> int:
    """Every batch of labels in ``batches`` drawn with ``draw(labels, seed)`` and written to the ADM
    ``.npz`` at ``path``; returns the number of images. Batch k runs on rank k % world with seed + k,
    so the file does not depend on the number of processes: each rank writes its part, rank 0 merges
    them in batch order."""
    mine = list(range(env.rank, len(batches), env.world_size))
    iterator = tqdm(mine, desc="sample", dynamic_ncols=True) if progress and tqdm is not None else mine
    images, labels = [], []
    for k in iterator:
        images.append(to_uint8(draw(batches[k].tolist(), seed + k)))
        labels.append(batches[k])
    shard = (np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8),
             np.concatenate(labels) if labels else np.zeros((0,), np.int64))
    if not env.distributed:
        save_npz(path, *shard)
        return len(shard[1])
    save_npz(_rank_part(path, env.rank), *shard)
    dist.barrier()
    if env.is_main:
        _merge_rank_parts(path, batches, env.world_size)
    dist.barrier()
    return sum(len(b) for b in batches)


def _rank_part(path: str, rank: int) -> str:
    return f"{path[:-4]}.rank{rank}.npz"


def _merge_rank_parts(path: str, batches: List[np.ndarray], world_size: int):
    parts = []
    for r in range(world_size):
        with np.load(_rank_part(path, r)) as f:
            parts.append((f["arr_0"], f["arr_1"]))
    order = [(k % world_size, k // world_size) for k in range(len(batches))]
    offsets = [np.cumsum([0] + [len(batches[k]) for k in range(r, len(batches), world_size)])
               for r in range(world_size)]
    images = np.concatenate([parts[r][0][offsets[r][i]:offsets[r][i + 1]] for r, i in order])
    labels = np.concatenate([parts[r][1][offsets[r][i]:offsets[r][i + 1]] for r, i in order])
    save_npz(path, images, labels)
    for r in range(world_size):
        os.remove(_rank_part(path, r))
