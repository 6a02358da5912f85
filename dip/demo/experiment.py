"""One run of the experiment: both models (DiT-only and DiP, one backbone) overfit one photo with the
same initial backbone, noise and time draws, and are sampled from the same noises at checkpoints."""
import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import dip_kernels

from ..diffusion import FlowMatching
from ..ema import EMA
from ..models import build_model
from ..sample import sample as sample_images
from .config import MODELS, PATCH, DemoConfig, device_of
from .metrics import high_frequency_share, load_target, noise_metrics, source_name


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


def build_demo_model(cfg: DemoConfig, head: str):
    model = build_model("DiP-Tiny", hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                        patch_size=PATCH, num_classes=1, head=head)
    if cfg.absolute_positions:
        grid = cfg.image_size // PATCH
        model.x_embedder = torch.nn.Sequential(model.x_embedder, AbsolutePositions(grid, grid, cfg.hidden_size))
    if head == "patch_detailer" and cfg.head_init == "he":
        he_init_(model.head)
    return model


def seeded_model(cfg: DemoConfig, head: str, seed: int):
    """The model with output ``head`` and the initial backbone of ``seed``, the same for every head.
    Seeding alone would not do: DiP's constructor initialises the embedders after building the head,
    whose own initialisation has drawn from the random stream by then."""
    torch.manual_seed(seed)
    reference = build_demo_model(cfg, "none")
    if head == "none":
        return reference
    model = build_demo_model(cfg, head)
    backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model


@torch.no_grad()
def perturb_ulps_(model: torch.nn.Module, ulps: int):
    """Moves every nonzero parameter ``ulps`` float32 ulps away from zero: the smallest change of the
    initial weights, the size of a difference in rounding between two machines."""
    for p in model.parameters():
        for _ in range(ulps):
            p.copy_(torch.where(p == 0, p, torch.nextafter(p, p.sign() * math.inf)))


def head_sensitivity(model, patches: int = 64, seed: int = 0) -> Dict[str, float]:
    """How much the Patch Detailer Head's output moves when its token, or its noisy patch, is
    perturbed (standard deviation of the change, unit-variance inputs and perturbations)."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    p, t = torch.randn(patches, 3, PATCH, PATCH, generator=g), torch.randn(patches, d, generator=g)
    ws = model.head.weights()
    with torch.no_grad():
        out = dip_kernels.patch_detailer(p, t, ws)
        by_token = dip_kernels.patch_detailer(p, t + torch.randn(t.shape, generator=g), ws) - out
        by_patch = dip_kernels.patch_detailer(p + torch.randn(p.shape, generator=g), t, ws) - out
    return {"output": out.std().item(), "token": by_token.std().item(), "patch": by_patch.std().item()}


def _sample_checkpoint(cfg: DemoConfig, ema: EMA, model, sampler, seed: int) -> torch.Tensor:
    """cfg.noises samples (noises, 3, S, S) on the CPU from the EMA weights, the same noises for both models."""
    sampler.load_state_dict(ema.full_state_dict(model))
    device = device_of(cfg.device)
    img = sample_images(sampler, [0] * cfg.noises, cfg.image_size, steps=cfg.sample_steps, cfg_scale=1.0, seed=seed,
                        method="euler", device=device, progress=False,
                        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return img.float().cpu()


def train_and_sample(cfg: DemoConfig, head: str, target: torch.Tensor, seed: int = 0,
                     on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Overfit one model (with output ``head``, see dip.models.HEADS) on ``target``. Returns {"losses":
    the training loss of every step, "checkpoints": {step: {"samples": (noises, 3, S, S) CPU tensor,
    "loss": mean loss since the previous checkpoint}}, "train_cpu_seconds": this process's CPU time
    outside sampling}. ``on_step(step, loss)`` follows each step."""
    cpu0 = time.process_time()
    device = device_of(cfg.device)
    model = seeded_model(cfg, head, seed).to(device)
    perturb_ulps_(model, cfg.init_ulps)
    sampler = build_demo_model(cfg, head).to(device).requires_grad_(False)
    ema = EMA(model, cfg.ema_decay(0))  # the trainer's EMA; the demo ramps its decay (cfg.ema_decay)
    # fused AdamW: one pass over the weights instead of a dozen (on CPU too: ~5x faster, and at
    # this model size the optimizer step otherwise costs as much as the DiT-only model's backward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    objective = FlowMatching(t_mean=cfg.training_t_mean())
    gen = torch.Generator(device=device).manual_seed(seed)  # same noise and times for both heads
    x = target.to(device).unsqueeze(0).expand(cfg.batch_size, -1, -1, -1).contiguous()
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses: List[float] = []
    checkpoints: Dict[int, dict] = {}
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        with autocast:
            loss = objective.loss(model, x, y, generator=gen)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.decay = cfg.ema_decay(step)
        ema.update(model)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if step in cfg.checkpoints:
            since = max([0] + [s for s in checkpoints])
            sampling0 = time.process_time()
            checkpoints[step] = {"samples": _sample_checkpoint(cfg, ema, model, sampler, seed),
                                 "loss": float(np.mean(losses[since:]))}
            cpu0 += time.process_time() - sampling0
    return {"losses": losses, "checkpoints": checkpoints, "train_cpu_seconds": time.process_time() - cpu0}


def run_one(cfg: DemoConfig, source: str, seed: int,
            on_step: Optional[Callable[[str, int, float], None]] = None) -> dict:
    """Both models on one (photo, seed): {"photo", "seed", "target", "models": {key: {name, head,
    train_seconds, cpu_seconds, losses, checkpoints: {step: metrics}, samples: {step: tensor}}},
    "cpu_seconds"}."""
    cpu0 = time.process_time()
    target = load_target(cfg.image_size, source)
    run = {"photo": source_name(source), "seed": seed, "target": target,
           "target_hf_share": high_frequency_share(target), "models": {}}
    for key, head, name in MODELS:
        t0, c0 = time.perf_counter(), time.process_time()
        report = (lambda step, loss, _name=name: on_step(_name, step, loss)) if on_step else None
        result = train_and_sample(cfg, head, target, seed, on_step=report)
        run["models"][key] = {
            "name": name, "head": head, "train_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "losses": result["losses"],
            "checkpoints": {str(step): {"loss": c["loss"], **noise_metrics(c["samples"], target)}
                            for step, c in result["checkpoints"].items()},
            "samples": {step: c["samples"] for step, c in result["checkpoints"].items()},
        }
    run["cpu_seconds"] = time.process_time() - cpu0
    return run
