"""A CUDA-graph Euler sampler for DiP: the same solve as ``dip.sample.euler_sample``, with each
denoising step (model forward with the dip kernels inside, classifier-free guidance combination,
Euler update) captured once in a CUDA graph and replayed for every step.

Why: a step of a small or medium DiP at modest batch sizes is dominated by kernel-launch and Python
overhead (dozens of ops per block); a replayed graph launches the whole step at once.

How:

* Static buffers per (device, batch, channels, H, W, input dtype, cfg scale, kernel backends): the
  float32 solver state ``x`` (updated in place by the step), a (2,) float32 ``[t, dt]`` tensor that
  is refreshed with one device-to-device ``copy_`` from a precomputed schedule before each replay,
  and the labels ``[y; null]`` (2B) whose first half the conditional-only step reads.
* Two graphs per entry: the guided step runs conditional and null branches as one batch of 2B;
  outside the guidance interval a second graph runs the conditional batch of B alone. Which graph a
  step replays is decided on the host, by step index (``dip.sample.guidance_schedule``, exact
  arithmetic), so the loop never reads a device value back.
* Before a capture the step is run a few times on a side stream (Triton compilation / autotuning,
  cuBLAS handles, the model's RoPE table cache) as the PyTorch CUDA-graph docs prescribe; all
  captures of a sampler share one private memory pool. Nothing allocated inside a capture outlives
  its own replay (the step writes its result into the static ``x``), which is what makes sharing the
  pool between interleaved graphs safe.
* On CPU, with ``use_cuda_graphs=False``, or when a capture fails (a warning says why), the sampler
  simply calls ``dip.sample.euler_sample``, so the numbers are those of the eager sampler.

A captured graph bakes in the model's parameter storages and the kernel backends selected at
capture time. Both are part of the cache check: if a parameter is replaced (``model.to(...)``,
``.half()``) the cache is dropped; in-place weight updates (``load_state_dict``, an EMA ``copy_``)
are picked up by the existing graphs. One sampler must not be used from two streams at once.
"""
import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import dip_kernels

from .diffusion import null_class_id
from .sample import (IntervalLike, _check, as_guidance_interval, cfg_combine, euler_sample, flow_time_grid,
                     guidance_schedule)

# One run compiles/autotunes the Triton kernels and creates cuBLAS/cuDNN handles and workspaces;
# the second confirms the steady state the capture must record.
WARMUP_ITERS = 2


def step_plan(steps: int, cfg_scale: float, guidance_interval: IntervalLike) -> List[Tuple[float, float, bool]]:
    """(t0, dt, guided) for each Euler step, on ``dip.sample.flow_time_grid(steps)`` and with the
    per-index guidance decision of ``dip.sample.guidance_schedule`` -- exactly what ``euler_sample`` does."""
    grid = flow_time_grid(steps)
    guided = guidance_schedule(steps, cfg_scale, guidance_interval)
    return [(grid[i], grid[i + 1] - grid[i], guided[i]) for i in range(steps)]


@dataclass
class _Entry:
    """Static buffers and captured graphs for one input shape / configuration."""
    x: torch.Tensor          # (B, C, H, W) float32 solver state, updated in place by every step
    time: torch.Tensor       # (2,) float32 [t, dt] of the step about to run
    labels: torch.Tensor     # (2B,) [y; null] with guidance, (B,) without
    input_dtype: torch.dtype  # the dtype the model sees (the noise's dtype), as in euler_sample
    cfg_scale: Optional[float]  # None: cfg off, only the conditional step exists
    graphs: Dict[bool, "torch.cuda.CUDAGraph"] = field(default_factory=dict)  # guided? -> graph


class GraphSampler:
    """Euler sampler that replays CUDA graphs of whole denoising steps.

    model: the (EMA) DiP to sample from; it runs in eval mode during a call (its mode is restored).
    steps, cfg_scale, guidance_interval: as in ``dip.sample.euler_sample`` (a GuidanceInterval, or a
    pair (lo, hi) meaning lo < t <= hi; scale 1 disables guidance). autocast_dtype (e.g.
    torch.bfloat16): the model runs under torch.autocast inside the captured step, the solver state
    stays float32.
    use_cuda_graphs=False always takes the eager path.

    ``sampler(noise, y)`` -> float32 (B, C, H, W), not clamped, like ``euler_sample``;
    ``sampler.sample(labels, image_size, seed, device)`` -> clamped images whose noise is drawn
    exactly as ``dip.sample.sample`` draws it. Any batch size and resolution work; each new shape
    captures new graphs once and keeps them (``reset()`` frees them).
    """

    def __init__(self, model: nn.Module, steps: int = 100, cfg_scale: float = 1.0,
                 guidance_interval: IntervalLike = (0.1, 1.0),
                 autocast_dtype: Optional[torch.dtype] = None, use_cuda_graphs: bool = True):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
            raise ValueError(f"cfg_scale must be a number, got {cfg_scale!r}")
        if autocast_dtype is not None and not (isinstance(autocast_dtype, torch.dtype)
                                               and autocast_dtype.is_floating_point):
            raise ValueError(f"autocast_dtype must be None or a floating torch.dtype, got {autocast_dtype!r}")
        self.model = model
        self.steps = steps
        self.cfg_scale = float(cfg_scale)
        self.guidance_interval = as_guidance_interval(guidance_interval)
        self.autocast_dtype = autocast_dtype
        self.use_cuda_graphs = bool(use_cuda_graphs)
        self.capture_error: Optional[str] = None  # set when a capture failed and graphs were turned off
        self.num_captures = 0  # graphs captured over the sampler's life (a test / diagnostics counter)
        self._entries: Dict[tuple, _Entry] = {}
        self._schedules: Dict[tuple, torch.Tensor] = {}
        self._pools: Dict[torch.device, tuple] = {}
        self._model_fingerprint = None

    # ------------------------------------------------------------------ public API
    def __call__(self, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Euler solve from ``noise`` (B, C, H, W) at t = 0 to t = 1 for class ids ``y`` (B,).
        Returns float32 (B, C, H, W), not clamped."""
        _check(noise, y)
        if self.graphs_usable(noise.device):
            try:
                return self._sample_static(noise, y, capture=True)
            except _CaptureFailed as failure:
                self.capture_error = str(failure)
                warnings.warn(f"GraphSampler: CUDA graph capture failed, falling back to the eager sampler "
                              f"from now on: {failure}", RuntimeWarning, stacklevel=2)
                self.reset()
        return self._sample_eager(noise, y)

    @torch.no_grad()
    def sample(self, labels: Union[Sequence[int], torch.Tensor], image_size: Union[int, Tuple[int, int]],
               seed: int = 0, device: Union[str, torch.device, None] = None,
               channels: Optional[int] = None) -> torch.Tensor:
        """Images for ``labels`` from the seeded noise of ``dip.sample.sample``: a CPU generator seeded
        with ``seed`` draws float32 (B, channels, H, W), moved to ``device`` (default: the model's).
        Returns float32 images clamped to [-1, 1]."""
        if device is None:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        device = torch.device(device)
        y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).to(device)
        if y.numel() == 0:
            raise ValueError("labels must hold at least one class id")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if channels is None:
            channels = int(getattr(self.model, "in_channels", 3))
        noise_gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn((y.shape[0], channels, h, w), generator=noise_gen, dtype=torch.float32).to(device)
        return self(noise, y).clamp(-1.0, 1.0)

    def graphs_usable(self, device: torch.device) -> bool:
        """Whether a call with tensors on ``device`` replays CUDA graphs (else: the eager sampler)."""
        return (self.use_cuda_graphs and self.capture_error is None and torch.device(device).type == "cuda"
                and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing())

    def cached_keys(self) -> List[tuple]:
        """Keys of the cached static-buffer entries: (device, B, C, H, W, dtype, cfg, backends)."""
        return list(self._entries)

    def num_graphs(self) -> int:
        """CUDA graphs currently held (each entry has up to two: guided, conditional-only)."""
        return sum(len(e.graphs) for e in self._entries.values())

    def reset(self):
        """Drops every captured graph and static buffer (their memory is freed once unreferenced)."""
        self._entries.clear()
        self._schedules.clear()
        self._pools.clear()
        self._model_fingerprint = None

    # ------------------------------------------------------------------ paths
    def _autocast(self, device_type: str, cache_enabled: bool = True):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _sample_eager(self, noise, y):
        # the same calls as dip.sample.sample's euler path, so the results are identical
        with self._eval_mode(), self._autocast(noise.device.type):
            return euler_sample(self.model, noise, y, steps=self.steps, cfg_scale=self.cfg_scale,
                                guidance_interval=self.guidance_interval)

    # no_grad, not inference_mode: the RoPE tables the model caches during warm-up must stay usable
    # in a later training forward of the same model, which inference tensors are not
    @torch.no_grad()
    def _sample_static(self, noise: torch.Tensor, y: torch.Tensor, capture: bool) -> torch.Tensor:
        """The static-buffer path. ``capture=True`` (CUDA only) captures missing graphs and replays
        them; ``capture=False`` runs the very same step functions eagerly on the static buffers (any
        device) -- the tests use it to check the captured step's logic and numerics on CPU."""
        device = noise.device
        plan = step_plan(self.steps, self.cfg_scale, self.guidance_interval)
        cfg_on = any(guided for _, _, guided in plan)
        self._check_model_unchanged()
        entry = self._entry(noise, cfg_on)
        schedule = self._schedule(plan, device)
        b = noise.shape[0]
        device_ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with device_ctx, self._eval_mode():
            entry.labels[:b].copy_(y)
            if capture:
                for guided in sorted({g for _, _, g in plan}):
                    if guided not in entry.graphs:
                        first = next(i for i, (_, _, g) in enumerate(plan) if g == guided)
                        entry.x.copy_(noise)
                        entry.time.copy_(schedule[first])
                        entry.graphs[guided] = self._capture(entry, guided, device)
            entry.x.copy_(noise)  # also undoes what the warm-up runs did to the state
            for i, (_, _, guided) in enumerate(plan):
                entry.time.copy_(schedule[i])
                if capture:
                    entry.graphs[guided].replay()
                else:
                    self._step(entry, guided)
            return entry.x.clone()

    # ------------------------------------------------------------------ the captured step
    def _step(self, entry: _Entry, guided: bool):
        """One Euler step on the static buffers: x <- x + dt * v(x, t). Allocates only transients."""
        b = entry.x.shape[0]
        x_in = entry.x.to(entry.input_dtype)
        with self._autocast(entry.x.device.type, cache_enabled=False):
            # autocast's weight-cast cache must stay off: cached casts would be made during warm-up,
            # outside the graph, and freed when the autocast region ends while the graph still reads them
            if guided:
                t_in = entry.time[:1].expand(2 * b).contiguous()
                pred_cond, pred_uncond = self.model(torch.cat([x_in, x_in], 0), t_in, entry.labels).chunk(2, 0)
                velocity = cfg_combine(pred_cond, pred_uncond, entry.cfg_scale)
            else:
                t_in = entry.time[:1].expand(b).contiguous()
                velocity = self.model(x_in, t_in, entry.labels[:b]).float()
            entry.x.add_(entry.time[1] * velocity)

    def _capture(self, entry: _Entry, guided: bool, device: torch.device) -> "torch.cuda.CUDAGraph":
        # warm-up on a side stream, per the PyTorch CUDA-graph docs; a failure here is a genuine
        # error of the model and propagates
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self._step(entry, guided)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                self._step(entry, guided)
        except Exception as e:  # e.g. an op that syncs with the host or is not capturable
            raise _CaptureFailed(f"{type(e).__name__}: {e}") from e
        self.num_captures += 1
        return graph

    # ------------------------------------------------------------------ caches
    def _entry(self, noise: torch.Tensor, cfg_on: bool) -> _Entry:
        b, c, h, w = noise.shape
        device = noise.device
        backends = tuple(dip_kernels.get_backend(op) for op in dip_kernels.OPS)
        key = (device, b, c, h, w, noise.dtype, self.cfg_scale if cfg_on else None, backends)
        entry = self._entries.get(key)
        if entry is None:
            labels = torch.empty(2 * b if cfg_on else b, dtype=torch.int64, device=device)
            if cfg_on:
                labels[b:].fill_(null_class_id(self.model))
            entry = _Entry(x=torch.empty((b, c, h, w), dtype=torch.float32, device=device),
                           time=torch.zeros(2, dtype=torch.float32, device=device), labels=labels,
                           input_dtype=noise.dtype, cfg_scale=self.cfg_scale if cfg_on else None)
            self._entries[key] = entry
        return entry

    def _schedule(self, plan, device: torch.device) -> torch.Tensor:
        """(steps, 2) float32 [t0, dt] rows on ``device``; the Python floats round to float32 exactly
        as euler_sample's torch.full(t0) and scalar multiply by (t1 - t0) round them."""
        key = (device, tuple(plan))
        table = self._schedules.get(key)
        if table is None:
            table = torch.tensor([[t0, dt] for t0, dt, _ in plan], dtype=torch.float32).to(device)
            self._schedules[key] = table
        return table

    def _check_model_unchanged(self):
        fingerprint = tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                            for t in (*self.model.parameters(), *self.model.buffers()))
        if fingerprint != self._model_fingerprint:
            self.reset()
            self._model_fingerprint = fingerprint


class _CaptureFailed(RuntimeError):
    pass
