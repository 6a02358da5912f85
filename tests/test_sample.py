"""Samplers of dip.sample: ODE correctness on toys, classifier-free guidance (which steps are guided,
decided by step index in exact arithmetic), no host read of a tensor during sampling, seeding, output
formats."""
import itertools
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dip.diffusion import DDPM
from dip.sample import (GuidanceInterval, as_guidance_interval, ddim_sample, ddim_steps, ddpm_sample, euler_sample,
                        flow_time_grid, guidance_active, guidance_schedule, guided_velocity, heun_sample,
                        parse_guidance_interval, sample, save_grid, save_npz, to_uint8)
from host_reads import no_host_reads

NUM_CLASSES = 4


class Recorder(nn.Module):
    """Base stand-in: records (batch size, t values, y) of every call; has num_classes and config."""

    def __init__(self):
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.config = SimpleNamespace(num_classes=NUM_CLASSES)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def record(self, x, t, y):
        assert t.shape == (x.shape[0],) and y.shape == (x.shape[0],) and t.dtype == torch.float32
        self.calls.append((x.shape[0], t.clone(), y.clone()))


class ZeroVelocity(Recorder):
    def forward(self, x, t, y):
        self.record(x, t, y)
        return torch.zeros_like(x)


class ClassModel(Recorder):
    """A prediction that depends on x, t and the class, so guidance visibly changes it."""

    def forward(self, x, t, y):
        self.record(x, t, y)
        return self.scale * x * (1 + t.view(-1, 1, 1, 1)) + y.view(-1, 1, 1, 1).float() - 1.5


class ExactVelocity(Recorder):
    """Knows the single data point: v = (x_data - x_t) / (1 - t) is the true flow-matching velocity."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def forward(self, x, t, y):
        self.record(x, t, y)
        return (self.data - x) / (1 - t).view(-1, 1, 1, 1)


class ExactEps(Recorder):
    """Knows the single data point and the DDPM schedule: returns the true eps of x_k."""

    def __init__(self, data, schedule):
        super().__init__()
        self.data, self.schedule = data, schedule

    def forward(self, x, t, y):
        self.record(x, t, y)
        k = torch.round((1 - t) * self.schedule.num_steps).long()
        ab = self.schedule.alphas_cumprod[k].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.data) / (1 - ab).sqrt()


def test_time_grid_ends_exactly_at_one():
    grid = flow_time_grid(7)
    assert len(grid) == 8 and grid[0] == 0.0 and grid[-1] == 1.0
    assert np.allclose(np.diff(grid), 1 / 7)
    with pytest.raises(ValueError):
        flow_time_grid(0)


def test_zero_velocity_leaves_noise_unchanged():
    noise = torch.randn(2, 3, 8, 8)
    model = ZeroVelocity()
    out = euler_sample(model, noise, torch.tensor([0, 1]), steps=5, cfg_scale=3.0)
    assert torch.equal(out, noise)
    assert [float(c[1][0]) for c in model.calls] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


@pytest.mark.parametrize("solver", [euler_sample, heun_sample])
def test_exact_velocity_reaches_the_data(solver):
    data = torch.rand(1, 3, 8, 8) * 2 - 1
    noise = torch.randn(3, 3, 8, 8)
    model = ExactVelocity(data)
    out = solver(model, noise, torch.tensor([0, 1, 2]), steps=6)
    torch.testing.assert_close(out, data.expand_as(out), rtol=0, atol=1e-5)
    assert len(model.calls) == (6 if solver is euler_sample else 11)


def test_guidance_scale_one_is_the_conditional_prediction():
    assert not any(guidance_schedule(10, 1.0, (0.0, 1.0)))  # scale 1: no step is guided
    model = ClassModel()
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 3])
    with torch.no_grad():
        expected = model(x, torch.full((3,), 0.5), y)
    model.calls.clear()
    out = guided_velocity(model, x, 0.5, y, cfg_scale=2.0, guided=False)
    torch.testing.assert_close(out, expected)
    assert [c[0] for c in model.calls] == [3]  # no wasted null-class branch


def test_guidance_inside_interval_is_one_batch_and_combines():
    model = ClassModel()
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 3])
    t = torch.full((3,), 0.5)
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, NUM_CLASSES))
    model.calls.clear()
    out = guided_velocity(model, x, 0.5, y, cfg_scale=2.9, guided=True)
    torch.testing.assert_close(out, uncond + 2.9 * (cond - uncond))
    assert len(model.calls) == 1
    batch, seen_t, seen_y = model.calls[0]
    assert batch == 6
    assert torch.equal(seen_y, torch.tensor([0, 1, 3, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]))
    assert torch.equal(seen_t, torch.full((6,), 0.5))


def test_outside_interval_only_conditional_branch_runs():
    model = ClassModel()
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    euler_sample(model, noise, y, steps=10, cfg_scale=2.0, guidance_interval=(0.5, 1.0))
    times = [round(float(c[1][0]), 6) for c in model.calls]
    assert times == pytest.approx([i / 10 for i in range(10)])
    sizes = {time: c[0] for time, c in zip(times, model.calls)}
    for time, size in sizes.items():
        assert size == (4 if 0.5 < time <= 1.0 else 2), (time, size)
    for batch, _, seen_y in model.calls:
        if batch == 2:
            assert torch.equal(seen_y, y)  # no null class outside the interval

    model.calls.clear()
    heun_sample(model, noise, y, steps=4, cfg_scale=2.0, guidance_interval=(0.5, 1.0))
    for batch, seen_t, _ in model.calls:
        assert batch == (4 if 0.5 < float(seen_t[0]) <= 1.0 else 2)


def test_guidance_changes_the_samples():
    model = ClassModel()
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    plain = euler_sample(model, noise, y, steps=4)
    guided = euler_sample(model, noise, y, steps=4, cfg_scale=3.0, guidance_interval=(0.0, 1.0))
    assert not torch.allclose(plain, guided)


# ----------------------------------------------------------------------------- guided steps, by index
def _integer_rule(i, steps, lo_hundredths, hi_hundredths, include_lo, include_hi):
    """Is t = i/steps in the interval with ends lo/100 and hi/100? Integers only: i/steps >= a/100 iff
    100 i >= a steps."""
    lo_ok = 100 * i >= lo_hundredths * steps if include_lo else 100 * i > lo_hundredths * steps
    hi_ok = 100 * i <= hi_hundredths * steps if include_hi else 100 * i < hi_hundredths * steps
    return lo_ok and hi_ok


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 75, 100, 101, 250])
def test_guided_steps_follow_the_exact_rule_for_every_grid_and_bound(steps):
    ends = [0, 1, 10, 11, 33, 50, 97, 99, 100]  # hundredths: the interval ends as a user writes them
    for (a, b), include_lo, include_hi in itertools.product(
            [(a, b) for a in ends for b in ends if a <= b], (False, True), (False, True)):
        interval = GuidanceInterval(a / 100, b / 100, include_lo, include_hi)
        expected = [_integer_rule(i, steps, a, b, include_lo, include_hi) for i in range(steps + 1)]
        assert guidance_schedule(steps, 2.0, interval) == expected, (steps, str(interval))


def test_paper_interval_guides_steps_11_to_97_of_100():
    paper = GuidanceInterval(0.11, 0.97, include_lo=True, include_hi=True)
    guided = guidance_schedule(100, 2.9, paper)
    assert [i for i in range(100) if guided[i]] == list(range(11, 98))
    # the same ends under the official sampler's strict min < t < max give two steps fewer
    strict = GuidanceInterval(0.11, 0.97, include_lo=False, include_hi=False)
    assert [i for i, g in enumerate(guidance_schedule(100, 2.9, strict)[:100]) if g] == list(range(12, 97))
    # a plain pair is lo < t <= hi: the official (0.1, 1.0) guides steps 11..99 of the Euler grid
    assert [i for i, g in enumerate(guidance_schedule(100, 2.0, (0.1, 1.0))[:100]) if g] == list(range(11, 100))


def test_a_float_grid_would_move_an_edge_step():
    """Why the decision is made by index: the official sampler builds its grid in float32, where
    t_11 = linspace(0, 0.99, 100)[11] is just below 0.11, so a float comparison against the paper's
    closed interval would drop step 11. The exact rule keeps it whatever the grid's rounding."""
    float32_grid = torch.linspace(0, 0.99, 100, dtype=torch.float32).tolist()
    assert float32_grid[11] < 0.11 and not 0.11 <= float32_grid[11] <= 0.97
    assert guidance_active(Fraction(11, 100), 2.9, GuidanceInterval(0.11, 0.97, True, True))
    assert flow_time_grid(100)[11] == 0.11  # our double grid happens to hit it; the rule does not rely on that


def test_guidance_time_must_be_exact_and_intervals_are_checked():
    with pytest.raises(TypeError, match="exact"):
        guidance_active(0.5, 2.0, (0.1, 1.0))
    assert guidance_active(Fraction(1, 2), 2.0, (0.1, 1.0)) and not guidance_active(Fraction(1, 10), 2.0, (0.1, 1.0))
    assert as_guidance_interval((0.1, 1.0)) == GuidanceInterval(0.1, 1.0, include_lo=False, include_hi=True)
    assert str(GuidanceInterval(0.11, 0.97, True, True)) == "[0.11, 0.97]"
    assert str(as_guidance_interval((0, 1))) == "(0.0, 1.0]"
    assert all(guidance_schedule(4, 2.0, (-1.0, 1.0)))  # ends beyond [0, 1]: every step guided
    for bad in [(0.1,), (0.9, 0.1), ("a", 1.0), (0.1, float("nan")), (True, 1.0), 0.5]:
        with pytest.raises(ValueError, match="guidance_interval"):
            as_guidance_interval(bad)


def test_parse_guidance_interval_reads_what_str_writes():
    for interval in (GuidanceInterval(0.11, 0.97, True, True), GuidanceInterval(0.1, 1.0, False, False),
                     GuidanceInterval(0.0, 0.5, True, False), GuidanceInterval(0.2, 0.9)):
        assert parse_guidance_interval(str(interval)) == interval
    assert parse_guidance_interval("0.1,1.0") == as_guidance_interval((0.1, 1.0))
    assert parse_guidance_interval(" [0.11, 0.97] ") == GuidanceInterval(0.11, 0.97, True, True)
    for bad in ("0.1", "[0.1,0.2,0.3]", "{0.1,0.2}", "[a,1]", "(0.9,0.1)", "[]", ""):
        with pytest.raises(ValueError, match="guidance"):
            parse_guidance_interval(bad)


@pytest.mark.parametrize("solver, evaluations", [(euler_sample, lambda i: [i]), (heun_sample, lambda i: [i, i + 1])])
def test_samplers_guide_exactly_the_scheduled_evaluations(solver, evaluations):
    """Each model call runs 2B images (conditional + null class) exactly where guidance_schedule says,
    B images elsewhere: the unconditional half is skipped outside the interval."""
    model = ClassModel()
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    steps, interval = 20, GuidanceInterval(0.15, 0.85, include_lo=True, include_hi=True)
    solver(model, noise, y, steps=steps, cfg_scale=2.9, guidance_interval=interval)
    schedule = guidance_schedule(steps, 2.9, interval)
    points = [j for i in range(steps) for j in (evaluations(i) if i < steps - 1 else [i])]
    assert [c[0] for c in model.calls] == [4 if schedule[j] else 2 for j in points]
    assert [float(c[1][0]) for c in model.calls] == pytest.approx([j / steps for j in points])
    for batch, _, seen_y in model.calls:
        assert torch.equal(seen_y, torch.cat([y, torch.full_like(y, NUM_CLASSES)]) if batch == 4 else y)


def test_eps_samplers_guide_by_exact_model_time():
    model = ClassModel()
    schedule = DDPM(num_steps=100)
    ddim_sample(model, torch.randn(1, 3, 4, 4), torch.tensor([1]), steps=100, cfg_scale=2.0,
                guidance_interval=GuidanceInterval(0.11, 0.97, True, True), schedule=schedule)
    # step k = 99..0 runs at t = 1 - k/100: guided for k = 3..89
    assert [c[0] for c in model.calls] == [2 if 3 <= k <= 89 else 1 for k in range(99, -1, -1)]


# ----------------------------------------------------------------------------- no host reads
def test_the_host_read_guard_catches_reads():
    x = torch.ones(2)
    for read in (lambda: bool(x[0]), lambda: float(x[0]), lambda: x[0].item(), lambda: x.tolist(), lambda: x.cpu(),
                 lambda: x.nonzero(), lambda: f"{x[0]:.2f}"):
        with pytest.raises(AssertionError, match="host"), no_host_reads():
            read()


@pytest.mark.parametrize("method", ["euler", "heun", "ddim", "ddpm"])
def test_sampling_reads_no_tensor_back_to_the_host(method):
    """The whole sample() call, every step included, with a guidance interval that switches branches
    mid-run; the Euler sampler also with a real (tiny) DiP, whose forward is the same for every method."""
    models = pytest.importorskip("dip.models")
    interval = GuidanceInterval(0.3, 0.7, include_lo=True, include_hi=True)
    schedule = DDPM()  # a host-side (CPU float64) table, read once before the loop
    cases = [(ClassModel(), 4)] + ([(models.DiPTiny(), 16)] if method == "euler" else [])
    for model, size in cases:
        with no_host_reads(allow=[schedule.alphas_cumprod]) as guard:
            out = sample(model, [1, 2], size, steps=5, cfg_scale=2.9, method=method, guidance_interval=interval,
                         progress=False, schedule=schedule if method in ("ddim", "ddpm") else None)
        assert guard.calls > 20 and out.shape == (2, 3, size, size)  # it watched the work
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("solver", [ddim_sample, ddpm_sample])
def test_eps_samplers_with_exact_eps_reach_the_data(solver):
    schedule = DDPM()
    data = torch.rand(1, 3, 4, 4) * 1.8 - 0.9
    model = ExactEps(data, schedule)
    noise = torch.randn(2, 3, 4, 4)
    out = solver(model, noise, torch.tensor([0, 1]), steps=20, schedule=schedule,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, data.expand_as(out), rtol=0, atol=1e-4)
    assert len(model.calls) == 20
    assert float(model.calls[0][1][0]) == pytest.approx(0.001)  # k = 999 -> t = 1 - 999/1000
    assert float(model.calls[-1][1][0]) == pytest.approx(1.0)


def test_ddim_steps():
    ks = ddim_steps(1000, 50)
    assert ks[0] == 999 and ks[-1] == 0 and len(ks) == 50 and ks == sorted(ks, reverse=True)
    assert ddim_steps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_steps(1000, 0)


@pytest.mark.parametrize("method", ["euler", "heun", "ddim", "ddpm"])
def test_sample_is_seeded_and_in_range(method):
    model = ClassModel()
    model.train()
    kwargs = dict(labels=[0, 3], image_size=(4, 8), steps=5, cfg_scale=2.0, method=method, progress=False)
    a = sample(model, seed=11, **kwargs)
    b = sample(model, seed=11, **kwargs)
    c = sample(model, seed=12, **kwargs)
    assert a.shape == (2, 3, 4, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert model.training  # the mode is restored


def test_sample_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        sample(ClassModel(), [0], 4, method="rk4", progress=False)


def test_to_uint8_and_save_npz_in_adm_format(tmp_path):
    images = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    u8 = to_uint8(images)
    assert u8.dtype == np.uint8 and u8.shape == (2, 2, 2, 3)
    assert u8[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    path = save_npz(str(tmp_path / "samples"), u8, [3, 1])
    assert path.endswith(".npz")
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2, 2, 2, 3)
        assert np.array_equal(data["arr_0"], u8) and data["arr_1"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="images_uint8"):
        save_npz(str(tmp_path / "bad.npz"), u8.astype(np.float32))


def test_save_grid_png(tmp_path):
    images = torch.rand(5, 3, 6, 4) * 2 - 1
    path = save_grid(images, str(tmp_path / "sub" / "grid.png"), nrow=3, padding=2)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (3 * (4 + 2) + 2, 2 * (6 + 2) + 2)
        grid = np.asarray(im)
    assert np.array_equal(grid[2:8, 2:6], to_uint8(images)[0])


def test_sample_with_real_dip_model():
    models = pytest.importorskip("dip.models")
    model = models.DiPTiny(num_classes=5)
    a = sample(model, [0, 4], 32, steps=2, cfg_scale=2.9, seed=0, guidance_interval=(0.0, 1.0), progress=False)
    b = sample(model, [0, 4], 32, steps=2, cfg_scale=2.9, seed=0, guidance_interval=(0.0, 1.0), progress=False)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and torch.isfinite(a).all()


def test_sample_under_autocast_keeps_float32_state():
    model = ClassModel()
    a = sample(model, [1, 2], 4, steps=3, seed=0, progress=False, autocast_dtype=torch.bfloat16)
    b = sample(model, [1, 2], 4, steps=3, seed=0, progress=False)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
