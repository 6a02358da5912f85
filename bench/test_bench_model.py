"""The whole DiP model. GPU: DiPXL16 at 256x256 (float32 weights, bf16 autocast, as trained):

  test_model_forward  sampling forward (no grad) at batch 2 (one image with guidance) and 64
  test_model_sample   a full Euler-100 sample with guidance on every step (the model runs at twice
                      the image count each step): one image (latency), and 32 images = batch 64 per
                      step (throughput, images/s in extra_info)
  test_model_train    one training step at batch 32: flow-matching MSE, backward, AdamW (fused on
                      CUDA); images/s and peak memory in extra_info

Providers (bench/providers.py, plus the dip variants below): reference (the reference functions,
no custom ops), compile (torch.compile of the model, ops plain), dip (the custom ops on backend
"auto"), and per test
  dip_graph    sample: dip.graph_sampler.GraphSampler with the dip ops, each Euler step one replayed
               CUDA graph (eager fallback on the CPU)
  dip_compile  train: torch.compile(model, fullgraph=True) with the dip ops inside (one graph)
  dip_ckpt     train: the dip ops with activation checkpointing per block (memory vs. recompute)
torch.compile's build time is the first call's wall time, kept as ``compile_build_s``; the warm-up
absorbs it. The compiled training steps build for minutes on GPU, so they are marked slow.

FLOPs per image: counted by torch's FlopCounterMode on a meta-device copy of the model, with the
dip ops' FLOPs added analytically (attention: its two matmuls; detailer: its convolutions); the
training step counts 3x the forward (4x with checkpointing, which reruns the forward). CPU: DiPTiny
at 32x32, float32, 2 Euler steps, tiny batches: the CPU run only proves every row works.
"""
import gc

import pytest
import torch

from dip import flops
from dip.models import DiPTiny, DiPXL16

from bench import cases, providers, timing

if cases.ON_GPU:
    BUILD, MODEL_NAME, RES, AMP, LABEL = DiPXL16, "DiPXL16", 256, torch.bfloat16, "bf16"
    FWD_BATCHES = {"b2": 2, "b64": 64}
    TRAIN_BATCH, STEPS = 32, 100
    SAMPLE_IMAGES = {"euler100-cfg": 1, "euler100-cfg-32img": 32}  # batch 2 and 64 per step
else:
    BUILD, MODEL_NAME, RES, AMP, LABEL = DiPTiny, "DiPTiny", 32, None, "f32"
    FWD_BATCHES = {"b2": 2}
    TRAIN_BATCH, STEPS = 2, 2
    SAMPLE_IMAGES = {"euler2-cfg": 1, "euler2-cfg-2img": 2}
CFG_SCALE = 2.9  # the paper's ImageNet 256 setting
GUIDE_ALWAYS = (-1.0, 1.0)  # guidance on every step, so each step runs the model at twice the images

SAMPLE_PROVIDERS = providers.MODEL_PROVIDERS + ("dip_graph",)
TRAIN_PROVIDERS = providers.MODEL_PROVIDERS + ("dip_compile", "dip_ckpt")
COMPILED = ("compile", "dip_compile")

FWD_CASES = [("fwd", LABEL, label, ("compile",) if n > 2 and cases.ON_GPU else False)
             for label, n in FWD_BATCHES.items()]
SAMPLE_CASES = [("sample", LABEL, label, ("compile",) if n > 1 and cases.ON_GPU else False)
                for label, n in SAMPLE_IMAGES.items()]
TRAIN_CASES = [("train", LABEL, f"b{TRAIN_BATCH}", COMPILED)]


def forward_flops_per_image(build=BUILD, res=RES):
    return flops.forward_flops_per_image(build, res)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    device = timing.bench_device()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # the detailer's small GEMMs crawl when OpenMP threads fight other processes for the cores
        torch.set_num_threads(1)
    with torch.device(device):
        m = BUILD()
    yield m
    torch.set_num_threads(threads)
    _compiled_models.clear()  # the compiled wrappers hold the model
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def flops_per_image():
    return forward_flops_per_image()


_compiled_models = {}


def _runner(model, provider):
    """The module the provider calls: the model itself, or one torch.compile wrapper of it per
    compiled provider (one static graph per batch size and grad mode). compile traces the plain
    reference functions; dip_compile traces the dip custom ops as single nodes, in one graph."""
    if provider not in COMPILED:
        return model
    key = (id(model), providers.compile_backend(), provider)
    if key not in _compiled_models:
        _compiled_models[key] = torch.compile(model, dynamic=False, backend=providers.compile_backend(),
                                              fullgraph=provider == "dip_compile")
    return _compiled_models[key]


def _backend(provider):
    """Every dip_* provider runs the custom ops on backend "auto"."""
    return providers.model_backend("dip" if provider.startswith("dip") else provider)


def _autocast(device):
    return torch.autocast(device.type, dtype=AMP, enabled=AMP is not None)


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _random_batch(b, device, num_classes):
    x = torch.randn(b, 3, RES, RES, device=device).clamp_(-1, 1)
    t = torch.rand(b, device=device)
    y = torch.randint(0, num_classes, (b,), device=device)
    return x, t, y


def _common_info(model, provider, device):
    record = {"model": MODEL_NAME, "resolution": RES, "params": sum(p.numel() for p in model.parameters()),
              "autocast": str(AMP) if AMP is not None else None}
    if provider in ("reference", "compile"):
        record["backends"] = "reference functions, no custom ops"
    else:
        with _backend(provider):
            record["backends"] = providers.resolved_backends(device)
    if provider in COMPILED:
        record["compile_backend"] = providers.compile_backend()
    return record


def _skip_unrequested(provider):
    if not providers.requested(provider):
        pytest.skip(f"provider {provider!r} not in DIP_BENCH_PROVIDERS")


# ----------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(FWD_CASES, providers.MODEL_PROVIDERS))
def test_model_forward(benchmark, device, model, flops_per_image, mode, dtype, case, provider):
    _skip_unrequested(provider)
    b = FWD_BATCHES[case]
    run = _runner(model, provider)

    def call(x, t, y):
        with torch.no_grad(), _autocast(device):
            return run(x, t, y)

    info = cases.info("model", "forward", mode, dtype, case, provider, shape={"x": (b, 3, RES, RES)},
                      flops=flops_per_image * b if flops_per_image else None,
                      bytes_moved=_param_bytes(model), bytes_note="parameters read once",
                      batch=b, **_common_info(model, provider, device))
    with providers.model_backend(provider):
        summary = timing.run(benchmark, call, lambda: _random_batch(b, device, model.num_classes),
                             info=info, device=device, warmup=2, min_rounds=5 if cases.ON_GPU else 1)
    if summary:
        benchmark.extra_info["images_per_s"] = b / (summary["time_ms"] * 1e-3)
    if provider == "compile":
        benchmark.extra_info["compile_build_s"] = benchmark.extra_info["first_call_s"]


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(SAMPLE_CASES, SAMPLE_PROVIDERS))
def test_model_sample(benchmark, device, model, flops_per_image, mode, dtype, case, provider):
    _skip_unrequested(provider)
    from dip.sample import euler_sample
    n = SAMPLE_IMAGES[case]
    if provider == "dip_graph":
        from dip.graph_sampler import GraphSampler
        sampler = GraphSampler(model, steps=STEPS, cfg_scale=CFG_SCALE, guidance_interval=GUIDE_ALWAYS,
                               autocast_dtype=AMP)

        def call(noise, y):
            return sampler(noise, y)
    else:
        run = _runner(model, provider)

        def call(noise, y):
            with _autocast(device):
                return euler_sample(run, noise, y, steps=STEPS, cfg_scale=CFG_SCALE, guidance_interval=GUIDE_ALWAYS)

    def make_inputs():
        return (torch.randn(n, 3, RES, RES, device=device),
                torch.randint(0, model.num_classes, (n,), device=device))

    info = cases.info("model", "euler_sample", mode, dtype, case, provider, shape={"x": (n, 3, RES, RES)},
                      flops=STEPS * 2 * n * flops_per_image if flops_per_image else None, bytes_moved=None,
                      steps=STEPS, cfg_scale=CFG_SCALE, guidance_interval=list(GUIDE_ALWAYS), images=n,
                      batch_per_step=2 * n, **_common_info(model, provider, device))
    with _backend(provider):
        # seconds per call in eager: the first call is warm-up enough (for dip_graph it captures
        # the graph), a few timed rounds; the throughput case runs tens of seconds per round
        summary = timing.run(benchmark, call, make_inputs, info=info, device=device, warmup=0,
                             min_rounds=(3 if n == 1 else 2) if cases.ON_GPU else 1, seconds=0.0,
                             input_sets=2 if cases.ON_GPU else 1)
    if summary:
        benchmark.extra_info["images_per_s"] = n / (summary["time_ms"] * 1e-3)
    if provider in COMPILED:
        benchmark.extra_info["compile_build_s"] = benchmark.extra_info["first_call_s"]
    if provider == "dip_graph":
        benchmark.extra_info["cuda_graphs"] = sampler.num_graphs()
        benchmark.extra_info["graph_capture_error"] = sampler.capture_error
        sampler.reset()


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(TRAIN_CASES, TRAIN_PROVIDERS))
def test_model_train(benchmark, device, model, flops_per_image, mode, dtype, case, provider):
    _skip_unrequested(provider)
    b = TRAIN_BATCH
    run = _runner(model, provider)
    checkpointing = provider == "dip_ckpt"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def make_inputs():
        x, t, y = _random_batch(b, device, model.num_classes)
        noise = torch.randn_like(x)
        tt = t.view(b, 1, 1, 1)
        return tt * x + (1 - tt) * noise, t, y, x - noise  # flow matching: x_t and its velocity

    def step(x_t, t, y, target):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            out = run(x_t, t, y)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()

    info = cases.info("model", "train_step", mode, dtype, case, provider, shape={"x": (b, 3, RES, RES)},
                      flops=(4 if checkpointing else 3) * b * flops_per_image if flops_per_image else None,
                      bytes_moved=None, flops_note="4x forward (recomputed)" if checkpointing else "3x forward",
                      batch=b, grad_checkpointing=checkpointing,
                      optimizer="AdamW(fused)" if device.type == "cuda" else "AdamW",
                      **_common_info(model, provider, device))
    model.set_grad_checkpointing(checkpointing)
    try:
        with _backend(provider):
            summary = timing.run(benchmark, step, make_inputs, info=info, device=device, warmup=2,
                                 min_rounds=5 if cases.ON_GPU else 1, input_sets=3 if cases.ON_GPU else 1)
            peak = timing.peak_memory(step, make_inputs(), device)
        if summary:
            benchmark.extra_info["images_per_s"] = b / (summary["time_ms"] * 1e-3)
        benchmark.extra_info["peak_memory_bytes"] = peak
        if provider in COMPILED:
            benchmark.extra_info["compile_build_s"] = benchmark.extra_info["first_call_s"]
    finally:
        model.set_grad_checkpointing(False)
        # leave no optimizer state or gradients behind for the next provider's memory numbers
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
