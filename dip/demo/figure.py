"""The demo's pictures: the samples side by side (demo.png) and the training curves (curves.png)."""
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..checkpoint import atomic_write
from .config import MODELS, PATCH
from .metrics import misplaced_patches

COLOURS = {"dit": (31, 119, 180), "dip": (255, 127, 14)}
WRONG = (255, 0, 0)


def _to_image(image: torch.Tensor, size: int) -> Image.Image:
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


def _with_wrong_patches(sample: torch.Tensor, target: torch.Tensor, tile: int) -> Image.Image:
    """The sample as a tile, its patches in the wrong place outlined in red."""
    img = _to_image(sample, tile)
    scale = tile / sample.shape[-1]
    draw = ImageDraw.Draw(img)
    for r, c in misplaced_patches(sample, target):
        draw.rectangle([c * PATCH * scale, r * PATCH * scale, (c + 1) * PATCH * scale - 1,
                        (r + 1) * PATCH * scale - 1], outline=WRONG)
    return img


def _save(canvas: Image.Image, path: str) -> str:
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="PNG", optimize=True)
    return path


def make_figure(runs: List[dict], path: str) -> str:
    """Per run, one row per model: the target (the zoom window outlined), the first noise's sample at
    each checkpoint, the other noises' samples at the last one (patches in the wrong place outlined in
    red), then the zoom window of the target and of the first noise's last sample, enlarged."""
    first = runs[0]
    steps = sorted(first["models"]["dit"]["samples"])
    noises = first["models"]["dit"]["samples"][steps[-1]].shape[0]
    image_size = first["target"].shape[-1]
    tile, crop = max(96, image_size), max(8, image_size // 4)
    pad, header, left = 4, 16, 130
    columns = (["target"] + [f"step {s}" for s in steps] + [f"noise {n}" for n in range(1, noises)]
               + ["target, zoomed", f"step {steps[-1]}, zoomed"])
    canvas = Image.new("RGB", (left + len(columns) * (tile + pad) + pad,
                               header + len(runs) * (len(MODELS) * (tile + pad) + pad)), "white")
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
                                          (top0 + crop) * scale - 1], outline=WRONG)
        for m, (key, _, name) in enumerate(MODELS):
            y = header + pad + r * (len(MODELS) * (tile + pad) + pad) + m * (tile + pad)
            draw.text((4, y + tile // 2 - 12), f"{run['photo']}, seed {run['seed']}", fill="black")
            draw.text((4, y + tile // 2 + 2), name, fill="black")
            samples = run["models"][key]["samples"]
            final = samples[steps[-1]]
            row = ([framed] + [_with_wrong_patches(samples[s][0], target, tile) for s in steps]
                   + [_with_wrong_patches(final[n], target, tile) for n in range(1, noises)]
                   + [zoom(target), zoom(final[0])])
            for col, img in enumerate(row):
                canvas.paste(img, (left + pad + col * (tile + pad), y))
    return _save(canvas, path)


def _plot(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], title: str,
          series: Sequence[Tuple[str, Sequence[float], Sequence[float]]], x_max: float, log_y: bool = False):
    """Lines (colour key, xs, ys) in box (left, top, right, bottom) with a frame, the title and the y range."""
    x0, y0, x1, y1 = box
    values = [math.log10(v) if log_y else v for _, _, ys in series for v in ys if not log_y or v > 0]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    draw.rectangle(box, outline="black")
    label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.1f}")  # noqa: E731
    draw.text((x0 + 4, y0 - 14), f"{title} ({label(lo)} to {label(hi)})", fill="black")
    for key, xs, ys in series:
        points = [(x0 + (x1 - x0) * x / x_max, y1 - (y1 - y0) * ((math.log10(y) if log_y else y) - lo) / (hi - lo))
                  for x, y in zip(xs, ys) if not log_y or y > 0]
        if len(points) > 1:
            draw.line(points, fill=COLOURS[key], width=2)
        for px, py in points if len(points) < 20 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLOURS[key])


def make_curves(runs: List[dict], path: str) -> str:
    """Per run: the training loss (a 10-step running mean, log scale) and the median PSNR of the
    samples at each checkpoint, DiT-only in blue, DiP in orange."""
    width, height, pad = 360, 200, 30
    canvas = Image.new("RGB", (2 * width + 3 * pad, len(runs) * (height + 2 * pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), "blue: DiT-only, orange: DiP", fill="black")
    for r, run in enumerate(runs):
        top = pad + r * (height + 2 * pad) + 16
        losses, psnrs = [], []
        for key, _, _ in MODELS:
            entry = run["models"][key]
            window = min(10, len(entry["losses"]))
            loss = np.convolve(entry["losses"], np.ones(window) / window, mode="valid")
            losses.append((key, list(range(window, window + len(loss))), loss.tolist()))
            steps = sorted(entry["checkpoints"], key=int)
            psnrs.append((key, [int(s) for s in steps], [entry["checkpoints"][s]["psnr"] for s in steps]))
        x_max = len(run["models"]["dit"]["losses"])
        name = f"{run['photo']} seed {run['seed']}"
        _plot(draw, (pad, top, pad + width, top + height), f"{name}: training loss", losses, x_max, log_y=True)
        _plot(draw, (2 * pad + width, top, 2 * pad + 2 * width, top + height), f"{name}: median PSNR (dB)",
              psnrs, x_max)
    return _save(canvas, path)
