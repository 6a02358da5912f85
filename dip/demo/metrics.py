"""The demo's target photos and its metrics: PSNR, layout PSNR, the high-frequency ratio, and the
patches drawn in the wrong place, per sample and as medians over the samples of a checkpoint."""
import math
import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from ..data import center_crop_arr, uint8_to_tensor
from .config import HF_CUTOFF, LAYOUT_POOL, PATCH, PHOTOS

# dB: a 16x16 patch of a sample further than PATCH_PSNR_MIN from the target's patch at its place, or
# MISPLACED_BY closer to one elsewhere in the target, is a patch in the wrong place (see misplaced_patches)
PATCH_PSNR_MIN = 12.0
MISPLACED_BY = 3.0
METRICS = ("psnr", "layout_psnr", "hf_ratio", "misplaced_patches")


def source_name(source: str) -> str:
    """A run's photo label: the bundled photo's name, or the user's file name."""
    return source if source in PHOTOS else os.path.basename(source)


def load_target(image_size: int, source: str = "astronaut") -> torch.Tensor:
    """A bundled scikit-image photo (by name, see PHOTOS) or an image file, ADM-centre-cropped to
    image_size: (3, S, S) float32 in [-1, 1]."""
    if source in PHOTOS:
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


def _patches(image: torch.Tensor) -> torch.Tensor:
    """(rows * cols, 3 * 16 * 16) float64: the image's 16x16 patches, row-major."""
    x = image.double().clamp(-1, 1)
    return x.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).permute(1, 2, 0, 3, 4).reshape(-1, 3 * PATCH * PATCH)


def misplaced_patches(sample: torch.Tensor, target: torch.Tensor) -> List[List[int]]:
    """[row, col] of every patch of the sample drawn in the wrong place: its PSNR against the target's
    patch at its own place is under PATCH_PSNR_MIN, or the target has a patch elsewhere that it
    matches MISPLACED_BY dB better. DiP's known failure at tiny budgets is a sharp patch in the wrong
    place, which a single PSNR folds in with blur; this counts it on its own."""
    mse = torch.cdist(_patches(sample), _patches(target)).pow(2) / (3 * PATCH * PATCH) / 4.0
    patch_db = -10.0 * torch.log10(mse.clamp_min(1e-20))  # [sample patch, target patch]
    own = patch_db.diagonal()
    elsewhere = patch_db.clone().fill_diagonal_(-math.inf).max(dim=1).values
    wrong = (own < PATCH_PSNR_MIN) | (elsewhere > own + MISPLACED_BY)
    cols = sample.shape[-1] // PATCH
    return [[int(i) // cols, int(i) % cols] for i in wrong.nonzero().flatten().tolist()]


def sample_metrics(sample: torch.Tensor, target: torch.Tensor) -> dict:
    return {"psnr": psnr(sample, target), "layout_psnr": layout_psnr(sample, target),
            "hf_ratio": high_frequency_ratio(sample, target),
            "misplaced_patches": len(misplaced_patches(sample, target))}


def noise_metrics(samples: Sequence[torch.Tensor], target: torch.Tensor) -> Dict[str, object]:
    """The metrics of a checkpoint's samples (one per starting noise): per metric the median, and
    the per-noise values under "per_noise"; "misplaced" lists each sample's wrong patches."""
    per = [sample_metrics(s, target) for s in samples]
    out: Dict[str, object] = {k: float(np.median([m[k] for m in per])) for k in METRICS}
    out["per_noise"] = {k: [m[k] for m in per] for k in METRICS}
    out["misplaced"] = [misplaced_patches(s, target) for s in samples]
    return out


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles and range of values (the spread over a checkpoint's noises)."""
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)), "q75": float(np.quantile(v, 0.75)),
            "min": float(v.min()), "max": float(v.max())}
