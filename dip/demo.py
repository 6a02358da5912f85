"""The paper's Fig. 3 experiment: overfit one image with a DiT-only model and with DiP.

Both models share one backbone (patch embedding on 16x16 pixel patches, the same DiT blocks, the
same initial weights for a seed) and differ only in the output head: ``head="none"`` is the DiT
final layer (a linear map from each token to its 768 pixel values), ``head="patch_detailer"`` is DiP's Patch
Detailer Head (a small conv U-Net on every patch, conditioned on the token). Each is trained with
flow matching on copies of a single photo (the copies differ in their noise and time draws; there
is no other augmentation, so the target is the one image) for the same number of steps, with the
same noise and time draws, and sampled with the Euler solver from a fixed seed at several
checkpoints. Paper's claim: the DiT-only model gets the layout and colours but stays blurry; DiP
renders sharp detail.

Backbone width: the DiT final layer maps each token linearly to the 768 values of its 16x16x3
patch, so a backbone narrower than 768 can only emit patches in a subspace and its samples stay
noisy for that reason alone; every preset uses a 768-wide backbone so that the comparison is about
the head, not the rank.

Metrics per model and checkpoint (:func:`psnr`, :func:`layout_psnr`, :func:`high_frequency_ratio`):
PSNR against the target; layout PSNR, the PSNR of both images average-pooled 4x4 (layout and
colour, not detail); and the high-frequency ratio (< 1 blurrier than the target, > 1 noisier).
:data:`VERDICT_RULE` says when a run shows the paper's effect. What the presets measured is in
README.md ("What `make demo` shows"), generated from the committed results in docs/demo/ by
``dip-demo --update-readme``; no figure is copied into this file.

Runs: one per (photo, seed), each training both models; runs go to worker processes in parallel
(``--jobs``, default one per core, each single-threaded: on a small CPU that beats one process
with many threads, whose small ops do not scale). The head runs on the ``cpu`` backend of
``torch.ops.dip.patch_detailer`` by default (dip_kernels/cpu, the same math as the eager
reference, faster); ``--head-backend eager`` runs the reference.

Outputs in ``--out``: ``demo.png`` (per run: target, each model's sample at each checkpoint, and
zoomed crops of the target and of the final samples) and ``demo.json`` (configuration, per run and
model the metrics at each checkpoint, margins, verdict, times).

    dip-demo                       # the default: astronaut at 64x64, seeds 0 and 1, a few minutes on 2 cores
    dip-demo --thorough            # 3 photos x 2 seeds at 128x128, tens of minutes on 2 cores
    dip-demo --image my.jpg        # your own photo (any size; centre-cropped)
    dip-demo --report demo.json    # print the tables of a finished run
    dip-demo --full                # GPU size: 256x256, DiP-B/16 backbone
"""
import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import dip_kernels

from .checkpoint import atomic_write, write_json
from .data import center_crop_arr, uint8_to_tensor
from .diffusion import FlowMatching
from .models import build_model
from .sample import sample as sample_images

MODELS = (("dit", "none", "DiT-only"), ("dip", "patch_detailer", "DiP"))
HF_CUTOFF = 0.25  # of the Nyquist frequency
LAYOUT_POOL = 4  # layout PSNR compares the images average-pooled over LAYOUT_POOL x LAYOUT_POOL pixels
LAYOUT_PSNR_MIN = 20.0  # dB: a sample at least this close to the target's layout has "converged to it"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
HEAD_INITS = ("he", "default")
HEAD_BACKENDS = ("cpu", "eager", "auto")  # of torch.ops.dip.patch_detailer, see dip_kernels.backends
VERDICT_RULE = (f"a run (photo, seed) shows the paper's effect when, at the last checkpoint, both models' layout PSNR "
                f"is at least {LAYOUT_PSNR_MIN:g} dB (both drew the photo's layout and colours), DiP's PSNR is "
                f"higher than DiT-only's, and DiP's high-frequency ratio is closer to 1 than DiT-only's")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = {"default": os.path.join(REPO, "docs", "demo", "default", "demo.json"),
           "thorough": os.path.join(REPO, "docs", "demo", "thorough", "demo.json")}


@dataclass
class DemoConfig:
    image_size: int = 64
    hidden_size: int = 768         # >= 3*16*16, so the DiT final layer can emit any patch (see above)
    depth: int = 2
    num_heads: int = 12
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 20
    ema: float = 0.95              # EMA of the weights used for sampling (0 = the raw weights)
    head_init: str = "he"          # DiP's head convolutions: "he" (see he_init_) or PyTorch's "default"
    absolute_positions: bool = True  # both backbones get fixed absolute positions (see AbsolutePositions)
    t_mean: Optional[float] = None  # logit-normal mean of the training times; None: see training_t_mean
    checkpoints: Sequence[int] = (100, 200, 400)
    sample_steps: int = 50
    seeds: Sequence[int] = (0, 1)
    photos: Sequence[str] = ("astronaut",)
    image: Optional[str] = None    # a photo file of the user's, instead of the bundled photos
    head_backend: Optional[str] = None  # the head op's backend; None: cpu on a CPU, auto on a GPU
    jobs: int = 0                  # worker processes; 0 = one per core, at most one per run
    threads: int = 0               # torch threads per worker; 0 = the cores shared out among the workers
    device: str = "auto"
    out: str = "demo_out"
    progress: bool = True

    def validate(self):
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of the 16-pixel patch, got {self.image_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError("hidden_size / num_heads must be a multiple of 4 (2D RoPE)")
        if self.steps < 1 or self.batch_size < 1 or self.sample_steps < 1 or self.warmup_steps < 0:
            raise ValueError("steps, batch_size and sample_steps must be positive, warmup_steps >= 0")
        bad = [c for c in self.checkpoints if not 1 <= c <= self.steps]
        if bad or not self.checkpoints:
            raise ValueError(f"checkpoints must be steps in [1, {self.steps}], got {list(self.checkpoints)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {list(self.seeds)}")
        if self.image is None:
            unknown = [p for p in self.photos if p not in PHOTOS]
            if unknown or not self.photos:
                raise ValueError(f"photos must be names from {', '.join(PHOTOS)}, got {list(self.photos)}")
        elif not os.path.isfile(self.image):
            raise FileNotFoundError(f"image {self.image!r} does not exist")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.head_backend is not None and self.head_backend not in HEAD_BACKENDS:
            raise ValueError(f"head_backend must be one of {HEAD_BACKENDS}, got {self.head_backend!r}")
        if self.head_backend == "cpu" and _device(self.device).type != "cpu":
            raise ValueError(f"head_backend cpu runs on CPU tensors; with device {self.device} use auto or eager")
        if self.jobs < 0 or self.threads < 0:
            raise ValueError(f"jobs and threads must be >= 0 (0 = automatic), got {self.jobs} and {self.threads}")
        self.checkpoints = tuple(sorted(set(int(c) for c in self.checkpoints)))
        self.seeds = tuple(int(s) for s in self.seeds)
        self.photos = tuple(self.photos)
        return self

    def training_t_mean(self) -> float:
        """The logit-normal mean of the training times (t = 1 clean). At a larger image the same
        noise level leaves more of the picture readable (more pixels per feature average the noise
        out), so with 64x64's times a 128x128 model spends less of its training where a patch's
        content must come from the backbone, and DiP's head learns to read it off the noisy patch:
        its samples are sharp patches in the wrong places. Default: shift the log-SNR by the
        resolution ratio (as SD3 and simple diffusion do), logit-normal mean -ln(image_size / 64),
        0 at 64x64; both models get it."""
        return -math.log(self.image_size / 64) if self.t_mean is None else self.t_mean

    def resolved_head_backend(self) -> str:
        if self.head_backend is not None:
            return self.head_backend
        return "cpu" if _device(self.device).type == "cpu" else "auto"

    def sources(self) -> List[str]:
        """What each run trains on: bundled photo names, or the user's file."""
        return [self.image] if self.image is not None else list(self.photos)


PRESETS = {
    "default": {},
    "thorough": dict(image_size=128, steps=600, batch_size=2, checkpoints=(150, 300, 600),
                     photos=("astronaut", "coffee", "chelsea"), out="demo_out_thorough"),
    "full": dict(image_size=256, hidden_size=768, depth=12, num_heads=12, steps=3000, batch_size=16, lr=2e-4,
                 warmup_steps=100, ema=0.99, checkpoints=(500, 1500, 3000), sample_steps=100, seeds=(0,),
                 out="demo_out_full"),
}


# ----------------------------------------------------------------------------- data and metrics
def source_name(source: str) -> str:
    """A run's photo label: the bundled photo's name, or the user's file name."""
    return source if source in PHOTOS else os.path.basename(source)


def load_target(image_size: int, source: str = "astronaut") -> torch.Tensor:
    """A bundled scikit-image photo (by name, see PHOTOS) or an image file, ADM-centre-cropped to
    image_size: (3, S, S) float32 in [-1, 1]."""
    from PIL import Image
    if source in PHOTOS:
        from skimage import data as skdata
        image = Image.fromarray(getattr(skdata, source)())
    else:
        with Image.open(source) as f:  # PIL's errors for unreadable files are OSErrors: a one-line error
            image = f.convert("RGB")
    return uint8_to_tensor(center_crop_arr(image, image_size))


def psnr(sample: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR on [0, 1] images)."""
    mse = (sample.double().clamp(-1, 1) - target.double()).pow(2).mean().item() / 4.0
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def layout_psnr(sample: torch.Tensor, target: torch.Tensor, pool: int = LAYOUT_POOL) -> float:
    """PSNR of the two images average-pooled over pool x pool pixels: how well the sample has the
    target's layout and colours, whatever its fine detail."""
    down = lambda x: torch.nn.functional.avg_pool2d(x.double().clamp(-1, 1)[None], pool)[0]  # noqa: E731
    return psnr(down(sample), down(target))


def high_frequency_share(image: torch.Tensor, cutoff: float = HF_CUTOFF) -> float:
    """Share of an image's spectral energy at high spatial frequency.

    Per channel, the mean is removed (so the DC term does not dominate) and the power |FFT|^2 is
    summed over frequencies whose radius sqrt(fx^2 + fy^2) exceeds ``cutoff`` times the Nyquist
    frequency (0.5 cycles/pixel), divided by the power summed over all frequencies."""
    x = image.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(dim=0)
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)[None, :]
    high = (fx.pow(2) + fy.pow(2)).sqrt() > cutoff * 0.5
    total = power.sum().item()
    return 0.0 if total == 0 else power[high].sum().item() / total


def high_frequency_ratio(sample: torch.Tensor, target: torch.Tensor, cutoff: float = HF_CUTOFF) -> float:
    """The sample's high-frequency share over the target's: < 1 means blurrier than the target,
    about 1 as detailed, > 1 more high-frequency energy (noise or artefacts)."""
    return high_frequency_share(sample, cutoff) / high_frequency_share(target, cutoff)


def sample_metrics(sample: torch.Tensor, target: torch.Tensor) -> dict:
    return {"psnr": psnr(sample, target), "layout_psnr": layout_psnr(sample, target),
            "hf_ratio": high_frequency_ratio(sample, target)}


# ----------------------------------------------------------------------------- training one model
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_demo_model(cfg: DemoConfig, head: str):
    model = build_model("DiP-Tiny", hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                        patch_size=16, num_classes=1, head=head)
    if cfg.absolute_positions:
        grid = cfg.image_size // 16
        model.x_embedder = torch.nn.Sequential(model.x_embedder, AbsolutePositions(grid, grid, cfg.hidden_size))
    if head == "patch_detailer" and cfg.head_init == "he":
        he_init_(model.head)
    return model


class AbsolutePositions(torch.nn.Module):
    """Adds DiT's fixed 2D sin-cos position embedding (half the channels encode the row, half the
    column) to the patch tokens (B, H*W, D).

    DiP's backbone knows positions only through RoPE, which is relative: attention cannot tell
    where a token is when every token looks alike, as they do in pure noise at the start of
    sampling. A deep backbone trained on many images can afford that (any layout is a good
    sample); a 2-block one overfitting one image must guess each patch's place, and a wrong guess
    is a patch drawn sharp in the wrong place. The demo adds the same absolute positions to both
    models' backbones, so the comparison stays about the head."""

    def __init__(self, grid_h: int, grid_w: int, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"the 2D sin-cos embedding needs a width divisible by 4, got {dim}")
        rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                    torch.arange(grid_w, dtype=torch.float64), indexing="ij")
        freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        angles = [pos.reshape(-1, 1) * freqs for pos in (rows, cols)]
        table = torch.cat([torch.cat([a.sin(), a.cos()], dim=1) for a in angles], dim=1)
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.table.to(tokens.dtype)


def he_init_(module: torch.nn.Module):
    """Variance-preserving (He) initialisation of every convolution in ``module``: weights normal with
    std sqrt(2 / fan-in), biases zero. PyTorch's default shrinks a signal about 1/sqrt(3) per layer,
    and the Patch Detailer Head's token enters nine layers from its output: at the default start the
    token moves the head's output by a negligible fraction of what the noisy patch does (see
    :func:`head_sensitivity`), so DiP spends its first few hundred steps as a local denoiser that
    ignores the backbone."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            # a ConvTranspose2d(k=2, stride=2) output pixel sees one input pixel: its fan-in is Cin
            fan_in = m.in_channels * (1 if isinstance(m, torch.nn.ConvTranspose2d) else m.kernel_size[0] * m.kernel_size[1])
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                m.bias.zero_()


def head_sensitivity(model, patches: int = 64, seed: int = 0) -> Dict[str, float]:
    """How much the Patch Detailer Head's output moves when its token, or its noisy patch, is
    perturbed (standard deviation of the change, unit-variance inputs and perturbations)."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    p, t = torch.randn(patches, 3, 16, 16, generator=g), torch.randn(patches, d, generator=g)
    ws = model.head.weights()
    with torch.no_grad():
        out = dip_kernels.patch_detailer(p, t, ws)
        by_token = dip_kernels.patch_detailer(p, t + torch.randn(t.shape, generator=g), ws) - out
        by_patch = dip_kernels.patch_detailer(p + torch.randn(p.shape, generator=g), t, ws) - out
    return {"output": out.std().item(), "token": by_token.std().item(), "patch": by_patch.std().item()}


def train_and_sample(cfg: DemoConfig, head: str, target: torch.Tensor, seed: int = 0,
                     on_step: Optional[Callable[[int, float], None]] = None) -> Dict[int, dict]:
    """Overfit one model (``head`` "none" or "patch_detailer") on ``target``; returns, per checkpoint step,
    {"sample": (3, S, S) CPU tensor, "loss": mean training loss since the previous checkpoint}.
    ``on_step(step, loss)`` is called after every step."""

    device = _device(cfg.device)
    torch.manual_seed(seed)  # the same initial backbone for both heads
    model = build_demo_model(cfg, head).to(device)
    ema_model = build_demo_model(cfg, head).to(device)
    ema_model.load_state_dict(model.state_dict())
    ema_model.requires_grad_(False)
    # fused AdamW: one pass over the weights instead of a dozen (on CPU too: ~5x faster, and at
    # this model size the optimizer step otherwise costs as much as the DiT-only model's backward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    objective = FlowMatching(t_mean=cfg.training_t_mean())
    gen = torch.Generator(device=device).manual_seed(seed)  # same noise and times for both heads
    x = target.to(device).unsqueeze(0).expand(cfg.batch_size, -1, -1, -1).contiguous()
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    params, ema_params = list(model.parameters()), list(ema_model.parameters())
    results: Dict[int, dict] = {}
    losses: List[float] = []
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))
        with autocast:
            loss = objective.loss(model, x, y, generator=gen)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - max(cfg.ema, 0.0))
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if step in cfg.checkpoints:
            with autocast:
                img = sample_images(ema_model, [0], cfg.image_size, steps=cfg.sample_steps, cfg_scale=1.0, seed=seed,
                           method="euler", device=device, progress=False)
            results[step] = {"sample": img[0].float().cpu(), "loss": float(np.mean(losses))}
            losses = []
    return results


def run_one(cfg: DemoConfig, source: str, seed: int,
            on_step: Optional[Callable[[str, int, float], None]] = None) -> dict:
    """Both models on one (photo, seed): {"photo", "seed", "target", "models": {key: {name, head,
    train_seconds, checkpoints: {step: metrics}, samples: {step: tensor}}}, "cpu_seconds"}."""
    cpu0 = time.process_time()
    target = load_target(cfg.image_size, source)
    run = {"photo": source_name(source), "seed": seed, "target": target,
           "target_hf_share": high_frequency_share(target), "models": {}}
    for key, head, name in MODELS:
        t0 = time.perf_counter()
        report = (lambda step, loss, _name=name: on_step(_name, step, loss)) if on_step else None
        results = train_and_sample(cfg, head, target, seed, on_step=report)
        run["models"][key] = {
            "name": name, "head": head, "train_seconds": time.perf_counter() - t0,
            "checkpoints": {str(step): {"loss": r["loss"], **sample_metrics(r["sample"], target)}
                            for step, r in results.items()},
            "samples": {step: r["sample"] for step, r in results.items()},
        }
    run["cpu_seconds"] = time.process_time() - cpu0
    return run


# ----------------------------------------------------------------------------- parallel runs
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_setup(threads: int, head_backend: str, queue):
    torch.set_num_threads(threads)
    dip_kernels.set_backend(head_backend, op="patch_detailer")
    global _progress_queue
    _progress_queue = queue


_progress_queue = None


def _worker_run(cfg: DemoConfig, index: int, source: str, seed: int) -> dict:
    last = [0.0]

    def on_step(name, step, loss):
        now = time.monotonic()
        if step == cfg.steps or now - last[0] > 0.5:  # a message per half second is plenty for a bar
            last[0] = now
            _progress_queue.put((index, name, step, loss))
    return run_one(cfg, source, seed, on_step if _progress_queue is not None else None)


class _Bars:
    """One progress bar per run: the model being trained, its step and its loss."""

    def __init__(self, cfg: DemoConfig, runs: List[Tuple[str, int]]):
        self.steps = cfg.steps
        self.bars = None
        if cfg.progress:
            from tqdm.auto import tqdm
            self.bars = [tqdm(total=len(MODELS) * cfg.steps, desc=f"{source_name(src)} seed {seed}", position=i,
                              dynamic_ncols=True, leave=True) for i, (src, seed) in enumerate(runs)]

    def update(self, index: int, name: str, step: int, loss: float):
        if self.bars is None:
            return
        offset = [n for _, _, n in MODELS].index(name) * self.steps
        bar = self.bars[index]
        bar.update(offset + step - bar.n)
        bar.set_postfix_str(f"{name} step {step}/{self.steps} loss {loss:.4f}", refresh=False)

    def close(self):
        for bar in self.bars or []:
            bar.close()


def run_all(cfg: DemoConfig) -> Tuple[List[dict], int, int]:
    """Every (photo, seed) run, in parallel worker processes when there are several cores and runs.
    Returns (runs in (photo, seed) order, worker processes, threads per worker)."""
    runs = [(src, seed) for src in cfg.sources() for seed in cfg.seeds]
    cores = usable_cores()
    jobs = min(cfg.jobs or cores, len(runs))
    if _device(cfg.device).type == "cuda":
        jobs = 1  # one GPU: the runs take turns on it
    threads = cfg.threads or max(1, cores // jobs)
    bars = _Bars(cfg, runs)
    try:
        if jobs == 1:
            old_threads, old_backend = torch.get_num_threads(), dip_kernels.get_backend("patch_detailer")
            torch.set_num_threads(threads)
            dip_kernels.set_backend(cfg.resolved_head_backend(), op="patch_detailer")
            try:
                results = [run_one(cfg, src, seed, lambda name, step, loss, i=i: bars.update(i, name, step, loss))
                           for i, (src, seed) in enumerate(runs)]
            finally:
                torch.set_num_threads(old_threads)
                dip_kernels.set_backend(old_backend, op="patch_detailer")
            return results, jobs, threads
        ctx = torch.multiprocessing.get_context("spawn")
        queue = ctx.Manager().Queue()
        with ctx.Pool(jobs, initializer=_worker_setup, initargs=(threads, cfg.resolved_head_backend(), queue)) as pool:
            pending = [pool.apply_async(_worker_run, (replace(cfg, progress=False), i, src, seed))
                       for i, (src, seed) in enumerate(runs)]
            while not all(p.ready() for p in pending):
                _drain(queue, bars, timeout=0.5)
            _drain(queue, bars, timeout=0)
            return [p.get() for p in pending], jobs, threads
    finally:
        bars.close()


def _drain(queue, bars: _Bars, timeout: float):
    import queue as queue_module
    try:
        message = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        while True:
            bars.update(*message)
            message = queue.get_nowait()
    except queue_module.Empty:
        pass


# ----------------------------------------------------------------------------- verdict and tables
def final_metrics(run: dict, key: str) -> dict:
    checkpoints = run["models"][key]["checkpoints"]
    return checkpoints[max(checkpoints, key=int)]


def judge(run: dict) -> dict:
    """The verdict on one run (VERDICT_RULE) with its margins at the last checkpoint: PSNR margin =
    DiP's PSNR - DiT-only's; HF margin = |DiT-only's HF ratio - 1| - |DiP's HF ratio - 1| (both
    positive when DiP is better)."""
    dit, dip = final_metrics(run, "dit"), final_metrics(run, "dip")
    layout = min(dit["layout_psnr"], dip["layout_psnr"]) >= LAYOUT_PSNR_MIN
    psnr_margin = dip["psnr"] - dit["psnr"]
    hf_margin = abs(dit["hf_ratio"] - 1) - abs(dip["hf_ratio"] - 1)
    return {"layout_converged": layout, "psnr_margin": psnr_margin, "hf_margin": hf_margin,
            "shows_effect": bool(layout and psnr_margin > 0 and hf_margin > 0)}


def summarize(runs: List[dict]) -> dict:
    """Margins over the runs (mean and worst case) and the one-sentence verdict."""
    verdicts = [run["verdict"] for run in runs]
    shown = [r for r, v in zip(runs, verdicts) if v["shows_effect"]]
    margins = {k: {"mean": float(np.mean([v[k] for v in verdicts])), "worst": float(min(v[k] for v in verdicts))}
               for k in ("psnr_margin", "hf_margin")}
    label = lambda r: f"{r['photo']} seed {r['seed']}"  # noqa: E731
    if len(shown) == len(runs):
        sentence = (f"This run shows the paper's effect on all {len(runs)} runs: DiP beats DiT-only on PSNR "
                    f"(by {margins['psnr_margin']['worst']:.2f} dB or more) and on the high-frequency ratio's "
                    f"distance from 1 (by {margins['hf_margin']['worst']:.3f} or more), both models on the photo's layout.")
    elif shown:
        missing = ", ".join(label(r) for r in runs if not r["verdict"]["shows_effect"])
        sentence = f"This run shows the paper's effect on {len(shown)} of {len(runs)} runs; not on {missing}."
    else:
        sentence = f"This run does not show the paper's effect on any of its {len(runs)} runs."
    return {"rule": VERDICT_RULE, "runs_showing_effect": len(shown), "runs": len(runs),
            "shows_effect": len(shown) == len(runs), "margins": margins, "sentence": sentence}


def _fmt_hf(value: float) -> str:
    return f"{value:.3f}"


def checkpoint_table(report: dict) -> str:
    """Markdown: every run, model and checkpoint."""
    lines = ["| photo | seed | model | step | train loss | PSNR (dB) | layout PSNR (dB) | HF ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for entry in run["models"].values():
            for step, m in entry["checkpoints"].items():
                lines.append(f"| {run['photo']} | {run['seed']} | {entry['name']} | {step} | {m['loss']:.3f} | "
                             f"{m['psnr']:.2f} | {m['layout_psnr']:.2f} | {_fmt_hf(m['hf_ratio'])} |")
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """Markdown: one row per run at its last checkpoint, the margins, and the verdict."""
    lines = ["| photo | seed | PSNR DiT-only | PSNR DiP | HF ratio DiT-only | HF ratio DiP | PSNR margin | "
             "HF margin | layout (both) | shows the effect |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        dit, dip, v = final_metrics(run, "dit"), final_metrics(run, "dip"), run["verdict"]
        lines.append(f"| {run['photo']} | {run['seed']} | {dit['psnr']:.2f} | {dip['psnr']:.2f} | "
                     f"{_fmt_hf(dit['hf_ratio'])} | {_fmt_hf(dip['hf_ratio'])} | {v['psnr_margin']:+.2f} | "
                     f"{v['hf_margin']:+.3f} | {'yes' if v['layout_converged'] else 'no'} | "
                     f"{'yes' if v['shows_effect'] else 'no'} |")
    m = report["summary"]["margins"]
    lines.append(f"| mean | | | | | | {m['psnr_margin']['mean']:+.2f} | {m['hf_margin']['mean']:+.3f} | | |")
    lines.append(f"| worst | | | | | | {m['psnr_margin']['worst']:+.2f} | {m['hf_margin']['worst']:+.3f} | | |")
    return "\n".join(lines)


def run_facts(report: dict) -> str:
    """One line: what was run, on what, in how long."""
    c, t = report["config"], report["timing"]
    photos = ", ".join(dict.fromkeys(r["photo"] for r in report["runs"]))
    seeds = ", ".join(str(s) for s in dict.fromkeys(r["seed"] for r in report["runs"]))
    return (f"{photos} at {c['image_size']}x{c['image_size']}, seeds {seeds}; {c['steps']} steps at batch "
            f"{c['batch_size']}, lr {c['lr']:g}, EMA {c['ema']:g}, a {c['hidden_size']}-wide {c['depth']}-block "
            f"backbone{_t_mean_text(c)}, Euler {c['sample_steps']} steps; head backend {report['head_backend']}. "
            f"{t['wall_seconds'] / 60:.1f} min wall, {t['cpu_seconds'] / 60:.1f} CPU-min, in {t['jobs']} "
            f"process(es) x {t['threads']} thread(s) on {t['cores']} cores{_load_text(t)}.")


def _t_mean_text(config: dict) -> str:
    t_mean = config.get("t_mean")
    return f", training times logit-normal with mean {t_mean:.2f}" if t_mean else ""


def _load_text(timing: dict) -> str:
    loads = timing.get("load_average")
    if not loads or None in loads:
        return ""
    return f", load average {loads[0]:.1f} before and {loads[1]:.1f} after"


def report_markdown(report: dict, checkpoints: bool = True) -> str:
    parts = [run_facts(report), ""]
    if checkpoints:
        parts += [checkpoint_table(report), ""]
    parts += [summary_table(report), "", report["summary"]["sentence"]]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- README sections
def readme_markers(section: str) -> Tuple[str, str]:
    return f"<!-- dip-demo {section}: generated by `dip-demo --update-readme` -->", f"<!-- dip-demo {section} end -->"


def readme_section(section: str, report: dict) -> str:
    """The README text between the section's markers, generated from a results file."""
    return report_markdown(report, checkpoints=section == "default")


def update_readme(readme: str, sections: Dict[str, dict]) -> str:
    """``readme`` with each section's marked block regenerated from its report."""
    for section, report in sections.items():
        begin, end = readme_markers(section)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise ValueError(f"README has no {begin!r} ... {end!r} block")
        readme = pattern.sub(lambda _: f"{begin}\n{readme_section(section, report)}\n{end}", readme)
    return readme


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if "runs" not in report or "summary" not in report:
        raise ValueError(f"{path!r} is not a dip-demo results file (no runs / summary)")
    return report


# ----------------------------------------------------------------------------- the figure
def _to_image(image: torch.Tensor, size: int):
    from PIL import Image
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((size, size), Image.NEAREST) if img.size[0] != size else img


def detail_window(target: torch.Tensor, crop: int) -> Tuple[int, int]:
    """(top, left) of the crop x crop window of the target with the most gradient energy: where
    detail, or its absence, shows best."""
    x = target.double()
    energy = (x[:, 1:, :-1] - x[:, :-1, :-1]).pow(2).sum(0) + (x[:, :-1, 1:] - x[:, :-1, :-1]).pow(2).sum(0)
    stride = max(1, crop // 4)
    boxes = torch.nn.functional.avg_pool2d(energy[None, None], crop - 1, stride=stride)[0, 0]
    row, col = divmod(int(boxes.argmax()), boxes.shape[1])
    return row * stride, col * stride


def make_figure(runs: List[dict], path: str) -> str:
    """Per run, one row per model: the target (the zoom window outlined), the model's sample at each
    checkpoint, then the zoom window of the target and of the last sample, enlarged."""
    from PIL import Image, ImageDraw
    first = runs[0]
    steps = sorted(first["models"]["dit"]["samples"])
    image_size = first["target"].shape[-1]
    tile = max(128, image_size)
    crop = max(8, image_size // 4)
    pad, header, left = 4, 16, 130
    columns = ["target"] + [f"step {s}" for s in steps] + ["target, zoomed", f"step {steps[-1]}, zoomed"]
    width = left + len(columns) * (tile + pad) + pad
    height = header + len(runs) * (len(MODELS) * (tile + pad) + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, text in enumerate(columns):
        draw.text((left + pad + col * (tile + pad) + 2, 2), text, fill="black")
    for r, run in enumerate(runs):
        target = run["target"]
        top0, left0 = detail_window(target, crop)
        zoom = lambda img: _to_image(img[:, top0:top0 + crop, left0:left0 + crop], tile)  # noqa: E731
        scale = tile / image_size
        framed = _to_image(target, tile)
        ImageDraw.Draw(framed).rectangle([left0 * scale, top0 * scale, (left0 + crop) * scale - 1,
                                          (top0 + crop) * scale - 1], outline=(255, 0, 0))
        for m, (key, _, name) in enumerate(MODELS):
            y = header + pad + r * (len(MODELS) * (tile + pad) + pad) + m * (tile + pad)
            draw.text((4, y + tile // 2 - 12), f"{run['photo']}, seed {run['seed']}", fill="black")
            draw.text((4, y + tile // 2 + 2), name, fill="black")
            samples = run["models"][key]["samples"]
            row = [framed] + [_to_image(samples[s], tile) for s in steps] + [zoom(target), zoom(samples[steps[-1]])]
            for col, img in enumerate(row):
                canvas.paste(img, (left + pad + col * (tile + pad), y))
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="PNG", optimize=True)
    return path


# ----------------------------------------------------------------------------- the whole demo
def _head_implementation(cfg: DemoConfig) -> str:
    """The implementation that ran the head op: the backend resolved for the run's device."""
    old = dip_kernels.get_backend("patch_detailer")
    try:
        dip_kernels.set_backend(cfg.resolved_head_backend(), op="patch_detailer")
        return dip_kernels.backends.resolve("patch_detailer", _device(cfg.device))
    finally:
        dip_kernels.set_backend(old, op="patch_detailer")


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def run_demo(cfg: DemoConfig) -> dict:
    """Trains both models on every (photo, seed), writes demo.png and demo.json into cfg.out, and
    returns the JSON dict."""
    cfg.validate()
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), _load_average()
    runs, jobs, threads = run_all(cfg)
    for run in runs:
        run["verdict"] = judge(run)
    figure = make_figure(runs, os.path.join(cfg.out, "demo.png"))
    saved_runs = [{k: v for k, v in run.items() if k != "target"} for run in runs]
    for run in saved_runs:
        run["models"] = {key: {k: v for k, v in entry.items() if k != "samples"} for key, entry in run["models"].items()}
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "progress", "jobs", "threads")}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    config["t_mean"] = cfg.training_t_mean()
    report = {
        "config": config,
        "metrics_doc": {
            "psnr": "dB against the target; images in [-1, 1] mapped to [0, 1]",
            "layout_psnr": f"PSNR of sample and target average-pooled {LAYOUT_POOL}x{LAYOUT_POOL}: layout and colour",
            "hf_ratio": ("high-frequency share of the sample / that of the target; share = power of the "
                         "mean-removed per-channel 2D FFT at radius > 1/4 Nyquist (0.125 cycles/pixel) "
                         "over the total power; < 1 blurrier than the target, > 1 noisier"),
        },
        "head_backend": _head_implementation(cfg),
        "torch": torch.__version__,
        "runs": saved_runs,
        "summary": summarize(runs),
        "figure": figure,
    }
    report["timing"] = {"wall_seconds": time.perf_counter() - wall0,
                        "cpu_seconds": time.process_time() - cpu0 + (sum(r["cpu_seconds"] for r in runs)
                                                                     if jobs > 1 else 0.0),
                        "jobs": jobs, "threads": threads, "cores": usable_cores(),
                        # what else ran weighs on the times: the 1-minute load average before and after
                        "load_average": [load0, _load_average()]}
    write_json(os.path.join(cfg.out, "demo.json"), report)
    return report


def config_from_args(args) -> DemoConfig:
    preset = "full" if args.full else "thorough" if args.thorough else "default"
    cfg = DemoConfig(**PRESETS[preset])
    names = ("out", "image_size", "hidden_size", "depth", "num_heads", "steps", "batch_size", "lr", "warmup_steps",
             "ema", "head_init", "absolute_positions", "t_mean", "checkpoints", "sample_steps", "seeds", "photos",
             "image", "head_backend", "jobs", "threads", "device")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if "steps" in overrides and "checkpoints" not in overrides:
        n = overrides["steps"]
        overrides["checkpoints"] = tuple(sorted({max(1, n // 4), max(1, n // 2), n}))
    cfg = replace(cfg, **overrides, progress=not args.no_progress)
    return cfg.validate()
