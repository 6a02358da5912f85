"""The whole DiP model. GPU: DiPXL16 at 256x256 (float32 weights, bf16 autocast, as trained):

  test_model_forward  sampling forward (no grad) at batch 2 (one image with guidance) and 64
  test_model_sample   a full Euler-100 sample of one image with guidance on every step (the model
                      runs at batch 2 each step), dip.sample.euler_sample
  test_model_train    one training step at batch 32: flow-matching MSE, backward, fused AdamW;
                      images/s and peak memory in extra_info

Providers (bench/providers.py): eager (every op on backend "eager"), compile (torch.compile of the
model, ops on "eager"), dip (backend "auto"). torch.compile's build time is the first call's wall
time, kept as ``compile_build_s``; the warm-up absorbs it. The compile provider's training step
builds for about two minutes, so it is marked slow.

FLOPs per image: counted by torch's FlopCounterMode on a meta-device copy of the model, with the
dip ops' FLOPs added analytically (attention: its two matmuls; head: its convolutions); the
training step counts 3x the forward. CPU: DiPTiny at 32x32, float32, 2 Euler steps.
"""
import gc

import pytest
import torch

from dip.models import DiPTiny, DiPXL16
from dip_kernels.reference.patch_detailer import flops_per_patch

from bench import cases, providers, timing

if cases.ON_GPU:
    BUILD, MODEL_NAME, RES, AMP, LABEL = DiPXL16, "DiPXL16", 256, torch.bfloat16, "bf16"
    FWD_BATCHES = {"b2": 2, "b64": 64}
    TRAIN_BATCH, STEPS, SAMPLE_CASE = 32, 100, "euler100-cfg"
else:
    BUILD, MODEL_NAME, RES, AMP, LABEL = DiPTiny, "DiPTiny", 32, None, "f32"
    FWD_BATCHES = {"b2": 2}
    TRAIN_BATCH, STEPS, SAMPLE_CASE = 2, 2, "euler2-cfg"
CFG_SCALE = 2.9  # the paper's ImageNet 256 setting
GUIDE_ALWAYS = (-1.0, 1.0)  # guidance on every step, so each step runs the model at batch 2

FWD_CASES = [("fwd", LABEL, label, ("compile",) if n > 2 and cases.ON_GPU else False)
             for label, n in FWD_BATCHES.items()]
SAMPLE_CASES = [("sample", LABEL, SAMPLE_CASE)]
TRAIN_CASES = [("train", LABEL, f"b{TRAIN_BATCH}", ("compile",))]


# ----------------------------------------------------------------------------- FLOPs
def _attention_flops(qkv, qw, kw, cos, sin, num_heads, eps, out_shape=None):
    b, n, three_hd = qkv
    return 4 * b * n * n * (three_hd // 3)


def _head_flops(patches, tokens, weights, out_shape=None):
    return patches[0] * flops_per_patch(patches[2], tokens[1])


def forward_flops_per_image(build=BUILD, res=RES):
    """FLOPs of one image's forward (matmuls, convolutions, attention), or None if counting fails."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.device("meta"):
            model = build()
        x = torch.randn(1, 3, res, res, device="meta")
        t = torch.rand(1, device="meta")
        y = torch.zeros(1, dtype=torch.long, device="meta")
        mapping = {torch.ops.dip.attention: _attention_flops, torch.ops.dip.patch_detailer: _head_flops}
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x, t, y)
        return int(counter.get_total_flops())
    except Exception:  # a model change the meta device cannot follow: report times without FLOPs
        return None


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    device = timing.bench_device()
    with torch.device(device):
        m = BUILD()
    yield m
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
    """The module the provider calls: the model itself, or one shared torch.compile wrapper of it
    (one static graph per batch size and grad mode)."""
    if provider != "compile":
        return model
    key = (id(model), providers.compile_backend())
    if key not in _compiled_models:
        _compiled_models[key] = torch.compile(model, dynamic=False, backend=providers.compile_backend())
    return _compiled_models[key]


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
    if provider in ("eager", "compile"):
        record["backends"] = "plain reference functions, no custom ops"
    else:
        with providers.model_backend(provider):
            record["backends"] = providers.resolved_backends(device)
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


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(SAMPLE_CASES, providers.MODEL_PROVIDERS))
def test_model_sample(benchmark, device, model, flops_per_image, mode, dtype, case, provider):
    _skip_unrequested(provider)
    from dip.sample import euler_sample
    run = _runner(model, provider)

    def call(noise, y):
        with _autocast(device):
            return euler_sample(run, noise, y, steps=STEPS, cfg_scale=CFG_SCALE, guidance_interval=GUIDE_ALWAYS)

    def make_inputs():
        return (torch.randn(1, 3, RES, RES, device=device),
                torch.randint(0, model.num_classes, (1,), device=device))

    info = cases.info("model", "euler_sample", mode, dtype, case, provider, shape={"x": (1, 3, RES, RES)},
                      flops=STEPS * 2 * flops_per_image if flops_per_image else None, bytes_moved=None,
                      steps=STEPS, cfg_scale=CFG_SCALE, guidance_interval=list(GUIDE_ALWAYS), batch_per_step=2,
                      **_common_info(model, provider, device))
    with providers.model_backend(provider):
        # seconds per call in eager: the first call is warm-up enough, three timed rounds
        timing.run(benchmark, call, make_inputs, info=info, device=device, warmup=0, min_rounds=3 if cases.ON_GPU else 1,
                   seconds=0.0, input_sets=2 if cases.ON_GPU else 1)
    if provider == "compile":
        benchmark.extra_info["compile_build_s"] = benchmark.extra_info["first_call_s"]


@pytest.mark.parametrize("mode,dtype,case,provider", cases.grid(TRAIN_CASES, providers.MODEL_PROVIDERS))
def test_model_train(benchmark, device, model, flops_per_image, mode, dtype, case, provider):
    _skip_unrequested(provider)
    b = TRAIN_BATCH
    run = _runner(model, provider)
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
                      flops=3 * b * flops_per_image if flops_per_image else None, bytes_moved=None,
                      flops_note="3x forward", batch=b, optimizer="AdamW(fused)" if device.type == "cuda" else "AdamW",
                      **_common_info(model, provider, device))
    try:
        with providers.model_backend(provider):
            summary = timing.run(benchmark, step, make_inputs, info=info, device=device, warmup=2,
                                 min_rounds=5 if cases.ON_GPU else 1, input_sets=3 if cases.ON_GPU else 1)
            peak = timing.peak_memory(step, make_inputs(), device)
        if summary:
            benchmark.extra_info["images_per_s"] = b / (summary["time_ms"] * 1e-3)
        benchmark.extra_info["peak_memory_bytes"] = peak
        if provider == "compile":
            benchmark.extra_info["compile_build_s"] = benchmark.extra_info["first_call_s"]
    finally:
        # leave no optimizer state or gradients behind for the next provider's memory numbers
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
