"""Training objectives for DiP: flow matching (the paper's), DDPM noise prediction, REPA alignment.

Time convention shared by every objective and sampler in this package: the model's ``t`` input is
the *cleanness* of its input, a float in [0, 1] with t = 1 the clean image and t = 0 pure noise.

* Flow matching (official DiP code): x_t = t * x + (1 - t) * eps, the model predicts the velocity
  v = x - eps (so dx_t/dt = v), t ~ sigmoid(N(0, 1)) (logit-normal), plain MSE with uniform weight.
* DDPM: linear betas 1e-4 .. 0.02 over 1000 steps, the model predicts eps. Discrete step k in
  [0, 1000) (k = 0 the least noisy, x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps) is fed to the model
  as t = 1 - k / 1000, so t lies in (0, 1] and keeps the "1 = clean" orientation of flow matching.
* REPA: an MLP projector maps the model's tokens after block ``block`` to a frozen encoder's patch
  features of the clean image; the loss is the negative mean cosine similarity (-1 at perfect
  alignment). The official code uses 1 - cos, which differs by a constant and has the same gradients.
"""
import os
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def randn(shape, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device in float32; drawn on the generator's
    own device (so a CPU generator gives the same numbers whatever device the data lives on)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _rand(shape, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def _unwrap(model: nn.Module) -> nn.Module:
    """Looks through torch.compile (``_orig_mod``) and DDP/FSDP-style (``module``) wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def null_class_id(model: nn.Module) -> int:
    """The class id the model reserves for "no class" (classifier-free guidance): ``model.num_classes``
    or ``model.config.num_classes``. Raises ValueError if the model has neither."""
    m = _unwrap(model)
    n = getattr(m, "num_classes", None)
    if n is None and getattr(m, "config", None) is not None:
        n = getattr(m.config, "num_classes", None)
    if n is None:
        raise ValueError("model must expose num_classes (or config.num_classes); its value is the null class id")
    return int(n)


def drop_labels(y: torch.Tensor, null_id: int, prob: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Classifier-free-guidance label dropout: each id in y (B,) int64 is replaced by ``null_id``
    with probability ``prob`` (official DiP trains with 0.1). Returns a new (B,) int64 tensor."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if prob == 0.0:
        return y
    drop = _rand((y.shape[0],), y, generator) < prob
    return torch.where(drop, torch.full_like(y, null_id), y)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean()


def _call_model(model, x_in, t, y, repa):
    """Runs the model, asking for the hidden tokens only when a REPA module needs them."""
    if repa is None:
        return model(x_in, t, y), None
    out, hidden = model(x_in, t, y, return_hidden_at=repa.block)
    return out, hidden


def _finish(losses: dict, x: torch.Tensor, hidden, repa, repa_weight: float) -> dict:
    if repa is not None:
        repa_loss = repa(hidden, x)
        losses["repa_loss"] = repa_loss
        losses["loss"] = losses["loss"] + repa_weight * repa_loss
    return losses


class FlowMatching:
    """Rectified-flow objective of the official DiP code.

    x_t = t * x + (1 - t) * eps, target v = x - eps, t = sigmoid(t_mean + t_std * N(0, 1)).
    All tensors images (B, C, H, W); t (B,) float32 in (0, 1)."""

    def __init__(self, t_mean: float = 0.0, t_std: float = 1.0):
        if t_std <= 0:
            raise ValueError(f"t_std must be positive, got {t_std}")
        self.t_mean, self.t_std = float(t_mean), float(t_std)

    def sample_t(self, batch: int, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logit-normal training times: (batch,) float32 on ``like``'s device, strictly inside (0, 1)
        up to float32 saturation of the sigmoid."""
        return torch.sigmoid(self.t_mean + self.t_std * randn((batch,), like, generator))

    @staticmethod
    def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = t * x + (1 - t) * noise; x, noise (B, C, H, W), t (B,). Returns float32 (B, C, H, W)."""
        t = _expand(t.float(), x)
        return t * x.float() + (1.0 - t) * noise.float()

    @staticmethod
    def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target v = x - noise, float32 (B, C, H, W)."""
        return x.float() - noise.float()

    @staticmethod
    def velocity_to_data(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate x_hat = x_t + (1 - t) v; t (B,) in [0, 1]."""
        return x_t.float() + _expand(1.0 - t.float(), x_t) * v.float()

    @staticmethod
    def velocity_to_noise(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise estimate eps_hat = x_t - t v; t (B,) in [0, 1]."""
        return x_t.float() - _expand(t.float(), x_t) * v.float()

    @staticmethod
    def data_to_velocity(x_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, min_gap: float = 1e-4) -> torch.Tensor:
        """Velocity from a clean-image estimate, v = (x_hat - x_t) / (1 - t); 1 - t is clamped at
        ``min_gap`` because the velocity is not determined by x_hat at t = 1."""
        return (x_hat.float() - x_t.float()) / _expand((1.0 - t.float()).clamp_min(min_gap), x_t)

    @staticmethod
    def noise_to_velocity(x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor, min_t: float = 1e-4) -> torch.Tensor:
        """Velocity from a noise estimate, v = (x_t - eps_hat) / t; t clamped at ``min_t``."""
        return (x_t.float() - eps_hat.float()) / _expand(t.float().clamp_min(min_t), x_t)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
             repa: Optional["REPALoss"] = None, repa_weight: float = 0.5,
             noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None) -> dict:
        """One training loss. x (B, C, H, W) clean images in [-1, 1]; y (B,) int64 class ids (already
        label-dropped if CFG training is wanted, see ``drop_labels``). ``generator`` drives t and the
        noise (t is drawn first, then the noise); ``noise``/``t`` override the draws.

        Returns dict(loss, fm_loss, t, and repa_loss when ``repa`` is given); loss = fm_loss +
        repa_weight * repa_loss (official weight 0.5). Losses are float32 scalars."""
        b = x.shape[0]
        if t is None:
            t = self.sample_t(b, x, generator)
        if noise is None:
            noise = randn(x.shape, x, generator)
        t = t.float()
        x_t = self.interpolate(x, noise, t).to(x.dtype)
        out, hidden = _call_model(model, x_t, t, y, repa)
        fm_loss = _mse(out, self.velocity_target(x, noise))
        return _finish({"loss": fm_loss, "fm_loss": fm_loss, "t": t}, x, hidden, repa, repa_weight)


class DDPM:
    """DDPM noise-prediction objective with the linear beta schedule of Ho et al. (1e-4 .. 0.02, 1000 steps).

    Step k in [0, num_steps): x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps, k = 0 the least noisy. The
    model sees t = 1 - k / num_steps (``step_to_t``). Schedule tensors are float64 on the CPU, (num_steps,)."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        self.num_steps = int(num_steps)
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{k-1} | x_k, x_0) of Ho et al. eq. (7)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    def step_to_t(self, k: torch.Tensor) -> torch.Tensor:
        """Discrete step(s) k (int tensor, any shape) -> model time t = 1 - k / num_steps, float32 in (0, 1]."""
        return 1.0 - k.float() / self.num_steps

    def gather(self, schedule: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """schedule[k] for a (B,) step tensor, as float32 (B, 1, 1, 1) on ``like``'s device."""
        return _expand(schedule.to(like.device)[k.to(like.device)].float(), like)

    def sample_steps(self, batch: int, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform training steps, (batch,) int64 in [0, num_steps) on ``like``'s device."""
        device = generator.device if generator is not None else like.device
        return torch.randint(0, self.num_steps, (batch,), generator=generator, device=device).to(like.device)

    def q_sample(self, x: torch.Tensor, noise: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """x_k = sqrt(abar_k) x + sqrt(1 - abar_k) noise; float32 (B, C, H, W)."""
        return (self.gather(self.sqrt_alphas_cumprod, k, x) * x.float()
                + self.gather(self.sqrt_one_minus_alphas_cumprod, k, x) * noise.float())

    def eps_to_data(self, x_k: torch.Tensor, eps: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate (x_k - sqrt(1 - abar_k) eps) / sqrt(abar_k)."""
        return ((x_k.float() - self.gather(self.sqrt_one_minus_alphas_cumprod, k, x_k) * eps.float())
                / self.gather(self.sqrt_alphas_cumprod, k, x_k))

    def data_to_eps(self, x_k: torch.Tensor, x0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Noise implied by a clean-image estimate, (x_k - sqrt(abar_k) x0) / sqrt(1 - abar_k)."""
        return ((x_k.float() - self.gather(self.sqrt_alphas_cumprod, k, x_k) * x0.float())
                / self.gather(self.sqrt_one_minus_alphas_cumprod, k, x_k))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
             repa: Optional["REPALoss"] = None, repa_weight: float = 0.5,
             noise: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None) -> dict:
        """Noise-prediction MSE. x (B, C, H, W) in [-1, 1], y (B,) int64. ``generator`` draws k first,
        then the noise. Returns dict(loss, eps_loss, k, t, and repa_loss when ``repa`` is given)."""
        b = x.shape[0]
        if k is None:
            k = self.sample_steps(b, x, generator)
        if noise is None:
            noise = randn(x.shape, x, generator)
        t = self.step_to_t(k)
        x_k = self.q_sample(x, noise, k).to(x.dtype)
        out, hidden = _call_model(model, x_k, t, y, repa)
        eps_loss = _mse(out, noise)
        return _finish({"loss": eps_loss, "eps_loss": eps_loss, "k": k, "t": t}, x, hidden, repa, repa_weight)


def load_frozen_encoder(path: str, map_location="cpu") -> nn.Module:
    """Loads a user-supplied feature network from a LOCAL TorchScript archive (``torch.jit.save``).
    A pickled ``nn.Module`` (``torch.save(module)``) is refused without being unpickled: unpickling
    runs code from the file; script or trace it where you trust it and save that. Nothing is
    downloaded. Returns the module in eval mode with requires_grad False on every parameter. Raises
    FileNotFoundError if ``path`` is not a file, ValueError if it is not a TorchScript archive."""
    if path is None or not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(
            f"encoder file not found: {path!r}. Pass the local path of a TorchScript file "
            "(e.g. torch.jit.save(torch.jit.trace(encoder, example), 'encoder.pt')); nothing is downloaded.")
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # recent torch marks TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location=map_location)
    except RuntimeError as jit_error:
        detail = str(jit_error).strip().splitlines()[0] if str(jit_error).strip() else "unreadable"
        raise ValueError(f"{path!r} is not a TorchScript file ({detail}); a pickled nn.Module is not loaded, since "
                         "unpickling can run code: where you trust it, save it with "
                         "torch.jit.save(torch.jit.trace(module, example), path)") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _token_grid(num_tokens: int, height: int, width: int) -> Tuple[int, int]:
    """The (rows, cols) grid of ``num_tokens`` tokens covering an image of height x width."""
    rows = max(1, round((num_tokens * height / width) ** 0.5))
    cols = num_tokens // rows
    if rows * cols != num_tokens:
        raise ValueError(f"cannot lay {num_tokens} tokens on a grid with the aspect of a {height}x{width} image")
    return rows, cols


class REPALoss(nn.Module):
    """REPA representation alignment (Yu et al. 2024) as used by DiP.

    encoder: frozen feature network (see ``load_frozen_encoder``) taking (B, 3, S, S) normalised
      images and returning (B, C, h, w) feature maps, (B, M, C) tokens (leading non-grid tokens such
      as CLS/registers are dropped: the last h*w tokens are kept, with the grid assumed square, or of
      the input's aspect), or a dict holding ``x_norm_patchtokens`` (DINOv2 forward_features).
    hidden_size: the model's token width D; encoder_dim: C; proj_hidden: projector width (official
      code: the model's hidden size); block: 1-based model block whose output is aligned (official: 8).
    input_size: resize clean images to (S, S) (or (S_h, S_w)) before the encoder; None keeps them.
    mean/std: per-channel normalisation applied to images mapped to [0, 1] (default ImageNet);
      None skips it.
    Only the projector trains; the encoder stays frozen and in eval mode."""

    def __init__(self, encoder: nn.Module, hidden_size: int, encoder_dim: int, proj_hidden: int = 2048,
                 block: int = 8, input_size=None, mean: Optional[Sequence[float]] = IMAGENET_MEAN,
                 std: Optional[Sequence[float]] = IMAGENET_STD):
        super().__init__()
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a 1-based block number, got {block!r}")
        self.block = block
        self.encoder = encoder
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, encoder_dim),
        )
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        """Sets the projector's mode; the encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()  # the frozen encoder never switches to training behaviour
        return self

    @torch.no_grad()
    def target_features(self, images: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Encoder features of clean images (B, 3, H, W) in [-1, 1], resampled to the model's token
        ``grid`` (rows, cols): float32 (B, rows*cols, C)."""
        x = (images.float() + 1.0) / 2.0
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        enc_param = next(self.encoder.parameters(), None)
        if enc_param is not None and enc_param.is_floating_point():
            x = x.to(enc_param.dtype)
        feats = self.encoder(x)
        if isinstance(feats, dict):
            feats = feats["x_norm_patchtokens"]
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        feats = feats.float()
        if feats.dim() == 3:  # (B, M, C) tokens: keep the patch grid, put channels first
            m = feats.shape[1]
            side = int(m ** 0.5)
            in_h, in_w = x.shape[-2:]
            rows, cols = (side, side) if in_h == in_w else _token_grid_floor(m, in_h, in_w)
            feats = feats[:, m - rows * cols:].transpose(1, 2).reshape(feats.shape[0], -1, rows, cols)
        elif feats.dim() != 4:
            raise ValueError(f"encoder output must be (B, C, h, w) or (B, M, C), got shape {tuple(feats.shape)}")
        if tuple(feats.shape[-2:]) != tuple(grid):
            feats = F.interpolate(feats, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return feats.flatten(2).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """hidden (B, N, D) model tokens, images (B, 3, H, W) clean in [-1, 1]. Returns the float32
        scalar -mean_{b,n} cos(projector(hidden), encoder features), in [-1, 1]."""
        if hidden is None or hidden.dim() != 3:
            raise ValueError("hidden must be the (B, N, D) tokens returned with return_hidden_at")
        grid = _token_grid(hidden.shape[1], images.shape[-2], images.shape[-1])
        target = self.target_features(images, grid)
        pred = self.projector(hidden).float()
        return self.alignment_loss(pred, target)

    @staticmethod
    def alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-mean cosine similarity over (B, N) of two (B, N, C) tensors, float32 scalar."""
        return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def _token_grid_floor(m: int, height: int, width: int) -> Tuple[int, int]:
    """Largest grid with the image's aspect that fits in m tokens (extra leading tokens are CLS/registers)."""
    rows = int((m * height / width) ** 0.5)
    while rows > 0:
        cols = round(rows * width / height)
        if rows * cols <= m:
            return rows, cols
        rows -= 1
    raise ValueError(f"cannot find a token grid in {m} encoder tokens")
