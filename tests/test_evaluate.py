"""Metrics of dip.evaluate: Frechet distance, k-NN precision/recall, inputs, extractor loading."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
from PIL import Image

import dip.evaluate as ev
from dip.sample import save_npz


class TinyInception(nn.Module):
    """A random conv net standing in for Inception: uint8-range NCHW floats -> (B, 16) pooled features."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2))

    def forward(self, x):
        return self.net(x / 127.5 - 1.0)  # (B, 16, h, w): the extractor wrapper averages h, w


class FeatureFlag(nn.Module):
    """forward(x, return_features) like the StyleGAN/ADM Inception detector."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x, return_features: bool = False):
        pooled = x.mean(dim=(2, 3))
        if return_features:
            return pooled
        return self.proj(pooled)


def smooth_images(n, size=16, seed=0):
    """Structured uint8 images: random low-frequency patterns plus a per-image colour."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    images = (up * 200 + 25).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def add_noise(images, sigma, seed=1):
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float64) + rng.normal(0, sigma, images.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture
def extractor_path(tmp_path):
    path = tmp_path / "tiny_inception.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return str(path)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)

    # non-commuting covariances: tr sqrt(S1 S2) from the (real, positive) eigenvalues of S1 S2
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    eig = torch.linalg.eigvals(torch.from_numpy(s1 @ s2)).real.numpy()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert ev.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_handles_singular_covariance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 20))  # rank 4 covariance in 20 dims
    mu, sigma = ev.feature_statistics(feats)
    assert sigma.shape == (20, 20)
    fid = ev.frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(fid) and abs(fid) < 1e-6


def test_fid_against_itself_is_zero_and_grows_with_noise(tmp_path, extractor_path):
    real = smooth_images(64)
    real_path = save_npz(str(tmp_path / "real.npz"), real)
    results = []
    for sigma in (0, 15, 40, 90):
        fake_path = save_npz(str(tmp_path / f"fake{sigma}.npz"), add_noise(real, sigma) if sigma else real)
        results.append(ev.evaluate(fake_path, real_path, extractor=extractor_path, batch_size=16, progress=False))
    fids = [r["fid"] for r in results]
    assert abs(fids[0]) < 1e-6
    assert fids[0] < fids[1] < fids[2] < fids[3], fids
    assert results[0]["precision"] == 1.0 and results[0]["recall"] == 1.0
    assert results[0]["num_samples"] == results[0]["num_reference"] == 64
    for r in results:
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8))
    assert ev.precision_recall(real, real, k=3, batch_size=7) == (1.0, 1.0)
    far = rng.normal(size=(40, 8)) + 100.0
    assert ev.precision_recall(real, far) == (0.0, 0.0)
    # samples collapsed onto a corner of the real distribution: precise but poor recall
    collapsed = real[:5] + rng.normal(scale=1e-3, size=(5, 8))
    precision, recall = ev.precision_recall(real, np.repeat(collapsed, 4, 0))
    assert precision == 1.0 and recall < 0.5
    with pytest.raises(ValueError, match="more than k"):
        ev.precision_recall(real[:3], real)


def test_feature_fn_and_folder_input(tmp_path):
    images = smooth_images(12, size=8)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    assert np.array_equal(ev.load_images(str(folder)), images)
    npz = save_npz(str(tmp_path / "same.npz"), images, np.arange(12))
    assert np.array_equal(ev.load_images(npz), images)

    def mean_colour(batch):
        return batch.reshape(batch.shape[0], -1, 3).mean(1)

    r = ev.evaluate(str(folder), npz, feature_fn=mean_colour, batch_size=5, progress=False)
    assert abs(r["fid"]) < 1e-9 and r["precision"] == 1.0 and r["recall"] == 1.0
    with pytest.raises(FileNotFoundError):
        ev.load_images(str(tmp_path / "nowhere"))


def test_extract_features_batches():
    images = smooth_images(7, size=8)
    calls = []

    def fn(batch):
        calls.append(len(batch))
        return torch.from_numpy(batch.reshape(len(batch), -1)[:, :5].astype(np.float32))

    feats = ev.extract_features(images, fn, batch_size=3, progress=False)
    assert calls == [3, 3, 1] and feats.shape == (7, 5) and feats.dtype == np.float64


def test_extractor_with_return_features_flag(tmp_path):
    path = tmp_path / "flag.pt"
    torch.jit.save(torch.jit.script(FeatureFlag()), str(path))
    extractor = ev.load_extractor(str(path), input_range=(-1.0, 1.0), resize=(4, 4))
    assert extractor.call_kwargs == {"return_features": True}
    images = np.full((2, 8, 8, 3), 255, np.uint8)
    feats = extractor(images)
    assert feats.shape == (2, 3) and np.allclose(feats, 1.0)  # pooled features, rescaled to [-1, 1]


def test_missing_extractor_gives_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "fid_helper_default_path", lambda: None)
    with pytest.raises(ev.ExtractorNotFoundError, match="--extractor PATH"):
        ev.load_extractor(None)
    with pytest.raises(FileNotFoundError, match="--extractor"):
        ev.load_extractor(str(tmp_path / "missing.pt"))
    npz = save_npz(str(tmp_path / "a.npz"), smooth_images(8, size=8))
    with pytest.raises(SystemExit, match="Nothing is downloaded"):
        ev.main([npz, npz, "--no-progress"])


def test_cli_writes_metrics(tmp_path, extractor_path, capsys):
    real = smooth_images(16)
    a = save_npz(str(tmp_path / "a.npz"), real)
    b = save_npz(str(tmp_path / "b.npz"), add_noise(real, 30))
    out_json = tmp_path / "metrics.json"
    metrics = ev.main([b, a, "--extractor", extractor_path, "--batch-size", "8", "--no-progress",
                       "--json", str(out_json)])
    assert "fid:" in capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert saved["fid"] == pytest.approx(metrics["fid"]) and saved["fid"] > 0
