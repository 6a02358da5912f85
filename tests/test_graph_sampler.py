"""dip.graph_sampler: the CUDA-graph Euler sampler.

CPU: the eager fallback is literally dip.sample.euler_sample; the static-buffer step that gets
captured on a GPU (run here without capture) reproduces euler_sample bit for bit, with the same model
calls per branch; entries are cached per shape; seeding matches dip.sample.sample; the step plan is
the pinned guidance schedule (dip.sample.guidance_schedule), and no path reads a tensor back to the
host (tests/host_reads.py).
GPU: graph replay against the eager sampler with DiPTiny and the auto kernel backends, and no
synchronizing call in the eager sampler or a replay (torch.cuda.set_sync_debug_mode).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from dip import models
from dip.graph_sampler import GraphSampler, step_plan
from dip.sample import GuidanceInterval, euler_sample, flow_time_grid, guidance_schedule, sample
from dip_kernels.testing import assert_close_to_fp64
from host_reads import no_host_reads

PAPER_INTERVAL = GuidanceInterval(0.11, 0.97, include_lo=True, include_hi=True)  # Appendix C's [0.11, 0.97]

NUM_CLASSES = 5


class CountingModel(nn.Module):
    """A velocity that depends on x, t and the class (so guidance matters); records every call's
    batch size, t and y, and the mode the model was in."""

    def __init__(self):
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.in_channels = 3
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.class_shift = nn.Parameter(torch.randn(NUM_CLASSES + 1))
        self.calls = []

    def forward(self, x, t, y):
        assert t.shape == (x.shape[0],) and y.shape == (x.shape[0],) and t.dtype == torch.float32
        self.calls.append((x.shape[0], t.clone(), y.clone(), self.training))
        out = self.scale * x * (1 + t.view(-1, 1, 1, 1)) + self.class_shift[y].view(-1, 1, 1, 1) - x.mean()
        return out.to(x.dtype)


def same_calls(a, b):
    return len(a) == len(b) and all(n1 == n2 and torch.equal(t1, t2) and torch.equal(y1, y2)
                                    for (n1, t1, y1, _), (n2, t2, y2, _) in zip(a, b))


def tiny_dip(device="cpu"):
    model = models.DiPTiny()
    with torch.no_grad():  # move every parameter away from its default so each one matters
        for p in model.parameters():
            p.add_(0.2 * (p.std() if p.numel() > 1 else 1.0) * torch.randn_like(p))
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ CPU
def test_step_plan_is_euler_grid_with_host_guidance_decision():
    plan = step_plan(10, 2.0, (0.3, 0.8))
    grid = flow_time_grid(10)
    assert [t0 for t0, _, _ in plan] == grid[:-1]
    assert all(t0 + dt == t1 for (t0, dt, _), t1 in zip(plan, grid[1:]))  # last step lands on t = 1
    assert [i for i, (_, _, g) in enumerate(plan) if g] == [4, 5, 6, 7, 8]  # 0.3 < t <= 0.8
    assert not any(g for _, _, g in step_plan(10, 1.0, (0.0, 1.0)))  # scale 1: never guided


def test_step_plan_is_the_pinned_guidance_schedule():
    for steps, interval in ((100, PAPER_INTERVAL), (37, PAPER_INTERVAL), (100, (0.1, 1.0))):
        plan = step_plan(steps, 2.9, interval)
        assert [g for _, _, g in plan] == guidance_schedule(steps, 2.9, interval)[:steps]
    assert [i for i, (_, _, g) in enumerate(step_plan(100, 2.9, PAPER_INTERVAL)) if g] == list(range(11, 98))


def test_pinned_schedule_through_every_cpu_path_with_no_host_reads(monkeypatch):
    """The eager fallback, the static-buffer step and the capture/replay bookkeeping (fake graphs)
    all guide exactly the scheduled steps, give euler_sample's numbers, and read nothing back."""
    model = CountingModel()
    steps, kwargs = 20, dict(steps=20, cfg_scale=2.9, guidance_interval=PAPER_INTERVAL)
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 3])
    ref = euler_sample(model, noise, y, **kwargs)
    expected_sizes = [4 if g else 2 for g in guidance_schedule(steps, 2.9, PAPER_INTERVAL)[:steps]]
    assert [n for n, _, _, _ in model.calls] == expected_sizes

    sampler = GraphSampler(model, **kwargs)
    assert sampler.guidance_interval == PAPER_INTERVAL
    replayed = []
    monkeypatch.setattr(sampler, "_capture", lambda entry, guided, device: FakeGraph(sampler, entry, guided, replayed))
    paths = {"eager fallback": lambda: sampler(noise, y),
             "static step": lambda: sampler._sample_static(noise, y, capture=False),
             "capture and replay": lambda: sampler._sample_static(noise, y, capture=True)}
    for name, run in paths.items():
        model.calls = []
        with no_host_reads() as guard:
            out = run()
        assert torch.equal(out, ref) and guard.calls > steps, name
        assert [n for n, _, _, _ in model.calls] == expected_sizes, name
    assert replayed == [g for _, _, g in step_plan(steps, 2.9, PAPER_INTERVAL)]  # each step replayed its graph


def test_cpu_fallback_is_the_eager_sampler():
    model = CountingModel()
    noise, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 4, 2])
    sampler = GraphSampler(model, steps=10, cfg_scale=2.5, guidance_interval=(0.3, 0.8))
    assert not sampler.graphs_usable(noise.device)
    out = sampler(noise, y)
    calls = model.calls
    model.calls = []
    ref = euler_sample(model, noise, y, steps=10, cfg_scale=2.5, guidance_interval=(0.3, 0.8))
    assert torch.equal(out, ref) and same_calls(calls, model.calls)
    assert sampler.cached_keys() == [] and sampler.num_captures == 0


@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float16])
def test_static_step_path_matches_eager_bit_for_bit_and_per_branch(noise_dtype):
    model = CountingModel().train()
    b = 3
    noise, y = torch.randn(b, 3, 8, 12).to(noise_dtype), torch.tensor([1, 0, 3])
    sampler = GraphSampler(model, steps=10, cfg_scale=3.0, guidance_interval=(0.3, 0.8))
    out = sampler._sample_static(noise, y, capture=False)
    static_calls = model.calls
    model.calls = []
    assert model.training  # the caller's mode is restored after the call ...
    ref = euler_sample(model, noise, y, steps=10, cfg_scale=3.0, guidance_interval=(0.3, 0.8))
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert same_calls(static_calls, model.calls)
    sizes = [n for n, _, _, _ in static_calls]
    assert sizes == [b] * 4 + [2 * b] * 5 + [b]  # t = 0..0.3 and 0.9 conditional alone; 0.4..0.8 guided
    guided = [(t, yy) for n, t, yy, _ in static_calls if n == 2 * b]
    assert all(torch.equal(yy, torch.tensor([1, 0, 3] + [NUM_CLASSES] * b)) for _, yy in guided)
    assert [t[0].item() for t, _ in guided] == [torch.tensor(v).item() for v in (0.4, 0.5, 0.6, 0.7, 0.8)]
    assert not any(training for _, _, _, training in static_calls)  # ... and it ran in eval mode


def test_static_step_path_with_tiny_dip_matches_eager_bit_for_bit():
    model = tiny_dip()
    noise, y = torch.randn(1, 3, 16, 32), torch.tensor([7])
    kwargs = dict(steps=3, cfg_scale=2.9, guidance_interval=(0.3, 0.8))  # t = 0 alone; 1/3, 2/3 guided
    out = GraphSampler(model, **kwargs)._sample_static(noise, y, capture=False)
    assert torch.equal(out, euler_sample(model, noise, y, **kwargs))


def test_entries_cached_per_shape_and_cfg_and_labels_refreshed():
    model = CountingModel()
    kwargs = dict(steps=5, cfg_scale=2.0, guidance_interval=(0.1, 0.6))
    sampler = GraphSampler(model, **kwargs)
    cases = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])), (torch.randn(3, 3, 4, 8), torch.tensor([2, 2, 4]))]
    for noise, y in cases:
        assert torch.equal(sampler._sample_static(noise, y, capture=False), euler_sample(model, noise, y, **kwargs))
    assert len(sampler.cached_keys()) == 2
    # same shape, new labels and noise: the cached entry is reused and sees the new labels
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([4, 3])
    assert torch.equal(sampler._sample_static(noise, y, capture=False), euler_sample(model, noise, y, **kwargs))
    assert len(sampler.cached_keys()) == 2
    sampler.steps = 7  # the step count only changes the host plan and the [t, dt] schedule
    assert torch.equal(sampler._sample_static(noise, y, capture=False),
                       euler_sample(model, noise, y, **dict(kwargs, steps=7)))
    assert len(sampler.cached_keys()) == 2
    sampler.steps = 5
    sampler.cfg_scale = 1.0  # cfg off: another entry (labels of B, no null half)
    assert torch.equal(sampler._sample_static(noise, y, capture=False),
                       euler_sample(model, noise, y, steps=5, cfg_scale=1.0))
    assert len(sampler.cached_keys()) == 3
    with torch.no_grad():
        model.scale = nn.Parameter(torch.tensor(0.3))  # a replaced parameter invalidates every entry
    assert torch.equal(sampler._sample_static(noise, y, capture=False),
                       euler_sample(model, noise, y, steps=5, cfg_scale=1.0))
    assert len(sampler.cached_keys()) == 1


def test_sample_is_seeded_like_dip_sample():
    model = CountingModel()
    kwargs = dict(steps=6, cfg_scale=2.0, guidance_interval=(0.3, 0.8))
    sampler = GraphSampler(model, **kwargs)
    a = sampler.sample([0, 3], (8, 12), seed=7, device="cpu")
    b = sampler.sample([0, 3], (8, 12), seed=7, device="cpu")
    c = sampler.sample([0, 3], (8, 12), seed=8, device="cpu")
    ref = sample(model, [0, 3], (8, 12), seed=7, device="cpu", progress=False, **kwargs)
    assert a.shape == (2, 3, 8, 12) and torch.equal(a, b) and torch.equal(a, ref) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0
    bf16 = GraphSampler(model, autocast_dtype=torch.bfloat16, **kwargs).sample([1], 8, seed=2)
    assert torch.equal(bf16, sample(model, [1], 8, seed=2, progress=False, autocast_dtype=torch.bfloat16, **kwargs))


class FakeGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on CPU: replay runs the step it was 'captured' for
    (and, given a list, records which graph each replay was)."""

    def __init__(self, sampler, entry, guided, replays=None):
        self.sampler, self.entry, self.guided, self.replays = sampler, entry, guided, replays

    def replay(self):
        if self.replays is not None:
            self.replays.append(self.guided)
        self.sampler._step(self.entry, self.guided)


def test_graph_path_bookkeeping_with_fake_capture(monkeypatch):
    # the capture/replay control flow of the CUDA path, on CPU: which graphs get captured, when
    # they are reused, and that each step replays the right one
    model = CountingModel()
    sampler = GraphSampler(model, steps=10, cfg_scale=2.0, guidance_interval=(0.3, 0.8))
    captured = []

    def fake_capture(entry, guided, device):
        captured.append((entry.x.shape[0], guided))
        sampler._step(entry, guided)  # what the warm-up does to the state: must not leak into the result
        return FakeGraph(sampler, entry, guided)
    monkeypatch.setattr(sampler, "_capture", fake_capture)
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 3])
    ref = euler_sample(model, noise, y, steps=10, cfg_scale=2.0, guidance_interval=(0.3, 0.8))
    assert torch.equal(sampler._sample_static(noise, y, capture=True), ref)
    assert captured == [(2, False), (2, True)] and sampler.num_graphs() == 2
    assert torch.equal(sampler._sample_static(noise, y, capture=True), ref)
    assert len(captured) == 2  # reused
    noise3, y3 = torch.randn(3, 3, 4, 4), torch.tensor([0, 0, 4])
    ref3 = euler_sample(model, noise3, y3, steps=10, cfg_scale=2.0, guidance_interval=(0.3, 0.8))
    assert torch.equal(sampler._sample_static(noise3, y3, capture=True), ref3)
    assert captured[2:] == [(3, False), (3, True)] and sampler.num_graphs() == 4
    sampler.guidance_interval = (0.95, 1.0)  # no guided step any more: only the conditional graph is needed
    ref_plain = euler_sample(model, noise, y, steps=10, cfg_scale=2.0, guidance_interval=(0.95, 1.0))
    assert torch.equal(sampler._sample_static(noise, y, capture=True), ref_plain)
    assert captured[4:] == [(2, False)]


def test_failed_capture_warns_and_falls_back_to_eager(monkeypatch):
    from dip import graph_sampler

    model = CountingModel()
    sampler = GraphSampler(model, steps=4, cfg_scale=2.0)

    def failing_capture(entry, guided, device):
        raise graph_sampler._CaptureFailed("RuntimeError: operation not permitted when stream is capturing")
    monkeypatch.setattr(sampler, "_capture", failing_capture)
    monkeypatch.setattr(sampler, "graphs_usable",
                        lambda device: sampler.capture_error is None)  # pretend CUDA graphs are available
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 3])
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = sampler(noise, y)
    assert torch.equal(out, euler_sample(model, noise, y, steps=4, cfg_scale=2.0))
    assert "not permitted" in sampler.capture_error and sampler.cached_keys() == []
    assert torch.equal(sampler(noise, y), out)  # later calls go straight to the eager sampler


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(cfg_scale="2"), "cfg_scale"),
    (dict(guidance_interval=(0.1,)), "guidance_interval"), (dict(autocast_dtype=torch.int8), "autocast_dtype"),
])
def test_bad_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GraphSampler(CountingModel(), **kwargs)


def test_bad_inputs_raise_value_error():
    sampler = GraphSampler(CountingModel(), steps=2)
    with pytest.raises(ValueError, match="noise"):
        sampler(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y"):
        sampler(torch.randn(2, 3, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        sampler.sample([], 4)


def test_sampling_precision_auto_is_bf16_on_cuda_like_training():
    from dip.sample import precision_autocast_dtype
    assert precision_autocast_dtype("auto", "cuda") == torch.bfloat16
    assert precision_autocast_dtype("auto", "cpu") is None
    assert precision_autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert precision_autocast_dtype("fp32", "cuda") is None
    with pytest.raises(ValueError, match="precision"):
        precision_autocast_dtype("fp16", "cuda")


# ------------------------------------------------------------------------------------------ GPU
# Graph replay launches the same kernels on the same inputs as the eager sampler (the static-step
# path is bit for bit euler_sample on CPU, above), so the replay must equal the eager sampler
# exactly; both are also judged against an fp64 Euler solve (fp64 model, eager reference ops, fp64
# state): at most 2x the eager sampler's own error in the same precision plus 1e-5 of the output's
# scale.

def euler_fp64(model, noise, y, steps, cfg_scale, interval):
    """Euler with guidance, everything in float64, written independently of the samplers."""
    model64 = copy.deepcopy(model).double()
    grid = flow_time_grid(steps)
    guided = guidance_schedule(steps, cfg_scale, interval)
    x = noise.double()
    b = x.shape[0]
    with torch.no_grad():
        for t0, t1, guided_step in zip(grid[:-1], grid[1:], guided):
            if guided_step:
                t = torch.full((2 * b,), t0, dtype=torch.float64, device=x.device)
                ys = torch.cat([y, torch.full_like(y, model.num_classes)])
                cond, uncond = model64(torch.cat([x, x]), t, ys).chunk(2)
                v = uncond + cfg_scale * (cond - uncond)
            else:
                v = model64(x, torch.full((b,), t0, dtype=torch.float64, device=x.device), y)
            x = x + (t1 - t0) * v
    return x


def autocast_ctx(dtype):
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_against_eager(sampler, model, noise, y, backend):
    out = sampler(noise, y)
    assert sampler.capture_error is None, sampler.capture_error
    with autocast_ctx(sampler.autocast_dtype):
        eager = euler_sample(model, noise, y, steps=sampler.steps, cfg_scale=sampler.cfg_scale,
                             guidance_interval=sampler.guidance_interval)
    backend("reference")
    ref64 = euler_fp64(model, noise, y, sampler.steps, sampler.cfg_scale, sampler.guidance_interval)
    backend("auto")
    print(f"graph vs eager max diff {(out - eager).abs().max().item():.3e}, "
          f"eager vs fp64 {(eager.double() - ref64).abs().max().item():.3e}")
    assert torch.equal(out, eager), "the graph replay differs from the eager sampler running the same kernels"
    assert_close_to_fp64(out, eager, ref64, name="graph sample")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_graph_replay_matches_eager_sampler(backend, autocast_dtype):
    backend("auto")
    model = tiny_dip("cuda")
    noise, y = torch.randn(3, 3, 32, 48, device="cuda"), torch.tensor([0, 7, 9], device="cuda")
    sampler = GraphSampler(model, steps=10, cfg_scale=3.0, guidance_interval=(0.3, 0.8),
                           autocast_dtype=autocast_dtype)
    assert sampler.graphs_usable(noise.device)
    check_against_eager(sampler, model, noise, y, backend)
    assert sampler.num_graphs() == 2 and sampler.num_captures == 2  # the guided and the conditional-only step
    # a second call replays: not a single Python forward runs, and new noise/labels are honoured
    forwards = []
    hook = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        noise2, y2 = torch.randn_like(noise), torch.tensor([5, 5, 1], device="cuda")
        out2 = sampler(noise2, y2)
    finally:
        hook.remove()
    assert forwards == [] and sampler.num_captures == 2
    with autocast_ctx(autocast_dtype):
        eager2 = euler_sample(model, noise2, y2, steps=10, cfg_scale=3.0, guidance_interval=(0.3, 0.8))
    backend("reference")
    ref2 = euler_fp64(model, noise2, y2, 10, 3.0, (0.3, 0.8))
    backend("auto")
    assert torch.equal(out2, eager2)
    assert_close_to_fp64(out2, eager2, ref2, name="replayed graph sample")


@pytest.mark.gpu
def test_new_batch_size_captures_new_graphs_and_all_entries_work(backend):
    backend("auto")
    model = tiny_dip("cuda")
    sampler = GraphSampler(model, steps=8, cfg_scale=2.0, guidance_interval=(0.3, 0.8))
    shapes = [(2, 32, 32), (5, 32, 32), (2, 16, 48)]
    inputs = [(torch.randn(b, 3, h, w, device="cuda"), torch.randint(0, 10, (b,), device="cuda"))
              for b, h, w in shapes]
    for noise, y in inputs:
        check_against_eager(sampler, model, noise, y, backend)
    assert len(sampler.cached_keys()) == 3 and sampler.num_captures == 6
    for noise, y in inputs:  # every cached entry still replays correctly after the others ran
        check_against_eager(sampler, model, torch.randn_like(noise), y.flip(0), backend)
    assert sampler.num_captures == 6
    sampler.cfg_scale = 1.0  # cfg off: one conditional-only graph for the shape
    check_against_eager(sampler, model, *inputs[0], backend)
    assert sampler.num_captures == 7 and len(sampler.cached_keys()) == 4


@pytest.mark.gpu
def test_eager_path_on_cuda_is_the_eager_sampler(backend):
    backend("auto")
    model = tiny_dip("cuda")
    noise, y = torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([1, 2], device="cuda")
    out = GraphSampler(model, steps=4, cfg_scale=2.0, use_cuda_graphs=False)(noise, y)
    assert torch.equal(out, euler_sample(model, noise, y, steps=4, cfg_scale=2.0))


@pytest.mark.gpu
def test_no_synchronizing_call_in_the_eager_sampler_or_a_replay(backend):
    backend("auto")
    model = tiny_dip("cuda")
    noise, y = torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([1, 2], device="cuda")
    kwargs = dict(steps=10, cfg_scale=2.9, guidance_interval=PAPER_INTERVAL)
    sampler = GraphSampler(model, **kwargs)
    first = sampler(noise, y)  # captures (a capture may synchronize); the replays below must not
    euler_sample(model, noise, y, **kwargs)  # warm: kernels compiled, RoPE table cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = sampler(noise, y)
        eager = euler_sample(model, noise, y, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(replayed, first) and torch.equal(replayed, eager)
