"""The demo's configuration: its constants, :class:`DemoConfig` and the presets."""
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


MODELS = (("dit", "none", "DiT-only"), ("dip", "patch_detailer", "DiP"))
HF_CUTOFF = 0.25  # of the Nyquist frequency
LAYOUT_POOL = 4  # layout PSNR compares the images average-pooled over LAYOUT_POOL x LAYOUT_POOL pixels
LAYOUT_PSNR_MIN = 20.0  # dB: a sample at least this close to the target's layout has "converged to it"
PATCH = 16  # pixels per patch side, the backbone's token
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
HEAD_INITS = ("he", "default")
# the logit-normal mean of the training times at 64x64: most steps at high noise, where a model learns
# the layout, so DiT-only draws it in fewer steps while DiP's samples stay sharp (docs/demo.md's recipe
# scan, docs/demo/recipe-scan/, has the measurements)
T_MEAN_64 = -1.2
# the detailer's backends by name; "cpu" and "eager", their former names, are still accepted
ONEDNN, REFERENCE = "onednn", "reference"
HEAD_BACKENDS = ("onednn", "cpu", "reference", "eager", "auto")
LR_SCHEDULES = ("cosine", "constant")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(REPO, "docs", "demo")
RESULTS = {"default": os.path.join(DOCS, "default", "demo.json"),
           "thorough": os.path.join(DOCS, "thorough", "demo.json")}
ROBUSTNESS_RESULTS = os.path.join(DOCS, "robustness", "robustness.json")
DEMO_PAGE = os.path.join(REPO, "docs", "demo.md")


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class DemoConfig:
    image_size: int = 64
    hidden_size: int = 768         # >= 3*16*16, so the DiT final layer can emit any patch (see dip.demo)
    depth: int = 2
    num_heads: int = 12
    steps: int = 175
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 5
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" decay to 0 at the last step
    ema: float = 0.9               # EMA decay of the sampled weights (0 = the raw weights), see ema_decay
    head_init: str = "he"          # DiP's head convolutions: "he" (see he_init_) or PyTorch's "default"
    absolute_positions: bool = True  # both backbones get fixed absolute positions (see AbsolutePositions)
    t_mean: Optional[float] = None  # logit-normal mean of the training times; None: see training_t_mean
    checkpoints: Sequence[int] = (100, 175)
    sample_steps: int = 25
    noises: int = 8                # samples per checkpoint, one per starting noise: the verdict is on their median
    seeds: Sequence[int] = (0, 1)
    photos: Sequence[str] = ("astronaut",)
    image: Optional[str] = None    # a photo file of the user's, instead of the bundled photos
    head_backend: Optional[str] = None  # the head op's backend; None: onednn on a CPU, auto on a GPU
    init_ulps: int = 0             # move every initial weight this many float32 ulps (a numerics perturbation)
    jobs: int = 0                  # worker processes; 0 = one per core, at most one per run
    threads: int = 0               # torch threads per worker; 0 = the cores shared out among the workers
    device: str = "auto"
    out: str = "demo_out"
    progress: bool = True

    def validate(self):
        if self.image_size < PATCH or self.image_size % PATCH:
            raise ValueError(f"image_size must be a positive multiple of the 16-pixel patch, got {self.image_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError("hidden_size / num_heads must be a multiple of 4 (2D RoPE)")
        if min(self.steps, self.batch_size, self.sample_steps, self.noises) < 1 or self.warmup_steps < 0:
            raise ValueError("steps, batch_size, sample_steps and noises must be positive, warmup_steps >= 0")
        bad = [c for c in self.checkpoints if not 1 <= c <= self.steps]
        if bad or not self.checkpoints:
            raise ValueError(f"checkpoints must be steps in [1, {self.steps}], got {list(self.checkpoints)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {list(self.seeds)}")
        self._validate_choices()
        self.checkpoints = tuple(sorted(set(int(c) for c in self.checkpoints)))
        self.seeds = tuple(int(s) for s in self.seeds)
        self.photos = tuple(self.photos)
        return self

    def _validate_choices(self):
        if self.image is None:
            unknown = [p for p in self.photos if p not in PHOTOS]
            if unknown or not self.photos:
                raise ValueError(f"photos must be names from {', '.join(PHOTOS)}, got {list(self.photos)}")
        elif not os.path.isfile(self.image):
            raise FileNotFoundError(f"image {self.image!r} does not exist")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.head_backend is not None and self.head_backend not in HEAD_BACKENDS:
            raise ValueError(f"head_backend must be one of {HEAD_BACKENDS}, got {self.head_backend!r}")
        if self.head_backend in ("onednn", "cpu") and device_of(self.device).type != "cpu":
            raise ValueError(f"head_backend {self.head_backend} runs on CPU tensors; with device {self.device} "
                             "use auto or reference")
        if self.jobs < 0 or self.threads < 0 or self.init_ulps < 0:
            raise ValueError(f"jobs, threads and init_ulps must be >= 0, got {self.jobs}, {self.threads}, "
                             f"{self.init_ulps}")

    def training_t_mean(self) -> float:
        """The logit-normal mean of the training times (t = 1 clean). At a larger image the same
        noise level leaves more of the picture readable (more pixels per feature average the noise
        out), so with 64x64's times a 128x128 model spends less of its training where a patch's
        content must come from the backbone, and DiP's head learns to read it off the noisy patch:
        its samples are sharp patches in the wrong places. Default: shift the log-SNR by the
        resolution ratio (as SD3 and simple diffusion do): logit-normal mean T_MEAN_64 - ln(image_size / 64);
        both models get it."""
        return T_MEAN_64 - math.log(self.image_size / 64) if self.t_mean is None else self.t_mean

    def resolved_head_backend(self) -> str:
        """The backend name passed to dip_kernels ("cpu" and "onednn" are one backend)."""
        if self.head_backend is None:
            return ONEDNN if device_of(self.device).type == "cpu" else "auto"
        if self.head_backend in ("onednn", "cpu"):
            return ONEDNN
        return REFERENCE if self.head_backend in ("reference", "eager") else self.head_backend

    def lr_at(self, step: int) -> float:
        """The learning rate of step (1-based): linear warm-up, then constant or a cosine decay that
        reaches 0 at the last step (a small model overfitting one photo at a constant rate keeps
        jumping between nearby solutions, and a sample can get worse between checkpoints)."""
        rate = self.lr * min(1.0, step / max(self.warmup_steps, 1))
        if self.lr_schedule == "cosine" and step > self.warmup_steps:
            progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
            rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return rate

    def ema_decay(self, step: int) -> float:
        """The EMA decay after step: ``ema``, ramped up as (1 + step) / (10 + step) at the start so the
        average forgets the random initial weights within a few dozen steps of a short run."""
        return min(max(self.ema, 0.0), (1.0 + step) / (10.0 + step))

    def sources(self) -> List[str]:
        """What each run trains on: bundled photo names, or the user's file."""
        return [self.image] if self.image is not None else list(self.photos)


PRESETS = {
    "default": {},
    "thorough": dict(image_size=128, steps=600, batch_size=2, checkpoints=(150, 300, 600), sample_steps=50,
                     photos=("astronaut", "coffee", "chelsea"), out="demo_out_thorough"),
    "full": dict(image_size=256, hidden_size=768, depth=12, num_heads=12, steps=3000, batch_size=16, lr=2e-4,
                 # the resolution's shift alone: T_MEAN_64 was measured on the CPU-size demo, not at this size
                 warmup_steps=100, ema=0.999, t_mean=-math.log(4),
                 checkpoints=(500, 1500, 3000), sample_steps=100, seeds=(0,),
                 out="demo_out_full"),
}
