"""Objectives of dip.diffusion: flow matching, DDPM eps prediction, REPA alignment, encoder loading."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")

from dip.diffusion import DDPM, FlowMatching, REPALoss, drop_labels, load_frozen_encoder, null_class_id


class TinyModel(nn.Module):
    """Stand-in with the DiP call contract: model(x, t, y[, return_hidden_at=k]); tokens on a 4x4-pixel patch grid."""

    def __init__(self, num_classes=4, dim=8, patch=4):
        super().__init__()
        self.num_classes = num_classes
        self.config = SimpleNamespace(num_classes=num_classes)
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.y_emb = nn.Embedding(num_classes + 1, dim)
        self.t_proj = nn.Linear(1, dim)
        self.out = nn.ConvTranspose2d(dim, 3, patch, stride=patch)
        self.calls = []

    def forward(self, x, t, y, return_hidden_at=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), y.detach().clone()))
        h = self.embed(x) + (self.y_emb(y) + self.t_proj(t[:, None].to(x.dtype)))[:, :, None, None]
        out = self.out(torch.tanh(h))
        tokens = h.flatten(2).transpose(1, 2)
        return (out, tokens) if return_hidden_at is not None else out


def conv_encoder(dim=6, stride=4):
    return nn.Sequential(nn.Conv2d(3, dim, stride, stride=stride), nn.GELU(), nn.Conv2d(dim, dim, 1))


class TokenEncoder(nn.Module):
    """ViT-like output: (B, 1 + h*w, C) with a leading CLS token."""

    def __init__(self, dim=6, stride=4):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, stride, stride=stride)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        cls = tokens.mean(1, keepdim=True) * 0 + 100.0  # very different from the patch tokens
        return torch.cat([cls, tokens], 1)


def test_flow_matching_loss_matches_independent_formulas():
    fm = FlowMatching()
    model = TinyModel()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    y = torch.tensor([0, 2, 3])
    out = fm.loss(model, x, y, generator=torch.Generator().manual_seed(123))

    g = torch.Generator().manual_seed(123)  # same draw order: t first, then the noise
    t = torch.sigmoid(torch.randn(3, generator=g))
    noise = torch.randn(3, 3, 8, 8, generator=g)
    x_t = t.view(3, 1, 1, 1) * x + (1 - t.view(3, 1, 1, 1)) * noise
    seen_x, seen_t, seen_y = model.calls[0]
    torch.testing.assert_close(out["t"], t)
    torch.testing.assert_close(seen_t, t)
    torch.testing.assert_close(seen_x, x_t)
    assert torch.equal(seen_y, y)
    with torch.no_grad():
        pred = model(x_t, t, y)
    expected = ((pred - (x - noise)) ** 2).mean()
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["fm_loss"], expected)
    assert "repa_loss" not in out


def test_flow_matching_same_generator_same_loss_and_backward():
    fm, model = FlowMatching(), TinyModel()
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([1, 0])
    a = fm.loss(model, x, y, generator=torch.Generator().manual_seed(5))
    b = fm.loss(model, x, y, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a["loss"], b["loss"])
    a["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p is not model.y_emb.weight)


def test_logit_normal_t():
    fm = FlowMatching()
    t = fm.sample_t(20000, torch.empty(0), torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05
    shifted = FlowMatching(t_mean=1.0).sample_t(20000, torch.empty(0), torch.Generator().manual_seed(0))
    assert shifted.median() > 0.7


def test_flow_conversions_round_trip():
    x, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0.0, 0.3, 0.7, 0.95])
    x_t = FlowMatching.interpolate(x, noise, t)
    v = FlowMatching.velocity_target(x, noise)
    torch.testing.assert_close(FlowMatching.velocity_to_data(x_t, v, t), x)
    torch.testing.assert_close(FlowMatching.velocity_to_noise(x_t, v, t), noise)
    torch.testing.assert_close(FlowMatching.data_to_velocity(x_t, x, t), v)
    torch.testing.assert_close(FlowMatching.noise_to_velocity(x_t[1:], noise[1:], t[1:]), v[1:], rtol=1e-4, atol=1e-4)


def test_ddpm_schedule_values():
    d = DDPM()
    assert d.num_steps == 1000 and d.betas.dtype == torch.float64
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    cumulative, expected = 1.0, []
    for b in betas:
        cumulative *= 1.0 - b
        expected.append(cumulative)
    for k in (0, 1, 99, 499, 999):
        assert math.isclose(d.alphas_cumprod[k].item(), expected[k], rel_tol=1e-9)
    assert math.isclose(d.alphas_cumprod[0].item(), 0.9999, rel_tol=1e-12)
    assert math.isclose(d.alphas_cumprod[-1].item(), 4.036e-5, rel_tol=1e-3)  # the well-known linear-schedule end
    assert d.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(d.posterior_variance[1:], d.betas[1:] * (1 - d.alphas_cumprod[:-1]) / (1 - d.alphas_cumprod[1:]))
    assert d.posterior_variance[0].item() == 0.0
    torch.testing.assert_close(d.step_to_t(torch.tensor([0, 500, 999])), torch.tensor([1.0, 0.5, 0.001]))


def test_ddpm_loss_and_conversions():
    d, model = DDPM(), TinyModel()
    x, y = torch.rand(3, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    out = d.loss(model, x, y, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    k = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(3, 3, 8, 8, generator=g)
    ab = d.alphas_cumprod[k].float().view(3, 1, 1, 1)
    x_k = ab.sqrt() * x + (1 - ab).sqrt() * noise
    seen_x, seen_t, _ = model.calls[0]
    assert torch.equal(out["k"], k)
    torch.testing.assert_close(seen_x, x_k)
    torch.testing.assert_close(seen_t, 1 - k.float() / 1000)
    with torch.no_grad():
        expected = ((model(x_k, seen_t, y) - noise) ** 2).mean()
    torch.testing.assert_close(out["eps_loss"], expected)
    torch.testing.assert_close(d.eps_to_data(x_k, noise, k), x, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(d.data_to_eps(x_k, x, k), noise, rtol=1e-3, atol=1e-3)


def test_repa_loss_is_minus_one_when_aligned_and_plus_one_when_opposed():
    enc = conv_encoder()
    repa = REPALoss(enc, hidden_size=6, encoder_dim=6, proj_hidden=16, block=1, mean=None, std=None)
    repa.projector = nn.Identity()  # the projector then hands the model tokens straight through
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        feats = enc((images + 1) / 2).flatten(2).transpose(1, 2)  # (2, 16, 6)
    assert repa(feats, images).item() == pytest.approx(-1.0, abs=1e-5)
    assert repa(-feats, images).item() == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= repa(torch.randn_like(feats), images).item() <= 1.0


def test_repa_token_encoder_drops_cls_and_resamples_grid():
    enc = TokenEncoder(stride=2)  # 16x16 input -> 8x8 grid + CLS
    repa = REPALoss(enc, hidden_size=8, encoder_dim=6, proj_hidden=16, block=1, input_size=16)
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # resized to 16 for the encoder
    target = repa.target_features(images, (4, 4))
    assert target.shape == (2, 16, 6)
    assert target.abs().max() < 50  # the CLS token (value 100) was dropped
    aligned = repa.target_features(images, (8, 8))
    repa.projector = nn.Identity()
    assert repa(aligned, images).item() == pytest.approx(-1.0, abs=1e-5)


def test_repa_gradients_reach_model_and_projector_only(tmp_path):
    path = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(conv_encoder(dim=5)), str(path))
    enc = load_frozen_encoder(str(path))
    model = TinyModel(dim=8)
    repa = REPALoss(enc, hidden_size=8, encoder_dim=5, proj_hidden=16, block=1, input_size=8)
    repa.train()
    assert not enc.training
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 3])
    for objective in (FlowMatching(), DDPM()):
        model.zero_grad(), repa.zero_grad()
        out = objective.loss(model, x, y, generator=torch.Generator().manual_seed(1), repa=repa, repa_weight=0.5)
        assert set(out) >= {"loss", "repa_loss"}
        main = out["fm_loss"] if "fm_loss" in out else out["eps_loss"]
        torch.testing.assert_close(out["loss"], main + 0.5 * out["repa_loss"])
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
        assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
        assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


def test_load_frozen_encoder_refuses_a_pickled_module_and_a_missing_file(tmp_path):
    # unpickling a module runs code from the file: only TorchScript archives are loaded
    module = conv_encoder()
    path = tmp_path / "enc_pickled.pt"
    torch.save(module, str(path))
    with pytest.raises(ValueError, match="pickled nn.Module is not loaded"):
        load_frozen_encoder(str(path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_frozen_encoder(str(tmp_path / "missing.pt"))
    torch.save({"not": "a module"}, str(tmp_path / "dict.pt"))
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_frozen_encoder(str(tmp_path / "dict.pt"))


def test_drop_labels_and_null_class():
    model = TinyModel(num_classes=7)
    assert null_class_id(model) == 7
    y = torch.arange(7).repeat(200)
    dropped = drop_labels(y, 7, 0.25, torch.Generator().manual_seed(0))
    frac = (dropped == 7).float().mean().item()
    assert 0.2 < frac < 0.3
    kept = dropped != 7
    assert torch.equal(dropped[kept], y[kept])
    assert torch.equal(drop_labels(y, 7, 0.0), y)
    with pytest.raises(ValueError, match="num_classes"):
        null_class_id(nn.Linear(2, 2))


def test_with_real_dip_model():
    models = pytest.importorskip("dip.models")
    model = models.DiPTiny(num_classes=5)
    assert null_class_id(model) == 5
    repa = REPALoss(conv_encoder(dim=4, stride=16), hidden_size=model.config.hidden_size, encoder_dim=4,
                    proj_hidden=16, block=1, mean=None, std=None)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 5])
    out = FlowMatching().loss(model, x, y, generator=torch.Generator().manual_seed(0), repa=repa)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["repa_loss"])
    assert any(p.grad is not None for p in model.parameters())
