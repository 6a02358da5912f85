"""Metrics of dip.evaluate: Frechet distance, k-NN precision/recall, inputs, extractor loading."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
from PIL import Image

import dip.evaluate as ev
from dip import cli
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


def test_frechet_distance_from_few_features_equals_the_full_route():
    rng = np.random.default_rng(2)
    d = 40
    m = rng.normal(size=(d, d))
    s1 = m @ m.T / d + 0.05 * np.eye(d)
    mu1 = rng.normal(size=d)
    # two features: S2 = v v^T with v = (f1 - f0) / sqrt(2), so tr sqrt(S1 S2) = sqrt(v^T S1 v) exactly
    feats = rng.normal(size=(2, d))
    mu2, s2 = ev.feature_statistics(feats)
    v = (feats[1] - feats[0]) / np.sqrt(2)
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + v @ v - 2 * np.sqrt(v @ s1 @ v)
    assert ev.frechet_distance(mu1, s1, mu2, s2, features2=feats) == pytest.approx(exact, rel=1e-12)
    for n in (2, 7, 30, 60):  # 60 > d: the full route is taken either way
        feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
        mu2, s2 = ev.feature_statistics(feats)
        full = ev.frechet_distance(mu1, s1, mu2, s2)
        assert ev.frechet_distance(mu1, s1, mu2, s2, features2=feats) == pytest.approx(full, rel=1e-10), n
        small = ev.FeatureStatistics.of_features(feats)
        big = ev.FeatureStatistics(mu1, s1)
        assert ev.statistics_fid(big, small) == pytest.approx(full, rel=1e-10)
        assert ev.statistics_fid(small, big) == ev.statistics_fid(big, small)


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
    assert cli.eval_main([npz, npz, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'dip-kernels[eval]' in err and "Nothing is downloaded" in err


def test_cli_writes_metrics(tmp_path, extractor_path, capsys):
    real = smooth_images(16)
    a = save_npz(str(tmp_path / "a.npz"), real)
    b = save_npz(str(tmp_path / "b.npz"), add_noise(real, 30))
    out_json = tmp_path / "metrics.json"
    assert cli.eval_main([b, a, "--extractor", extractor_path, "--batch-size", "8", "--no-progress",
                          "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert f"fid: {saved['fid']:.4f}" in out and f"recall: {saved['recall']:.4f}" in out and saved["fid"] > 0
    assert saved["network"].startswith("tiny_inception.pt sha1:") and saved["num_samples"] == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


class CountingFeatures:
    """Mean colour and its square per image; counts the images it sees."""
    identity = "counting mean colour"

    def __init__(self):
        self.seen = 0

    def __call__(self, batch):
        self.seen += len(batch)
        m = batch.reshape(batch.shape[0], -1, 3).mean(1) / 255.0
        return np.concatenate([m, m ** 2], 1)


def test_saved_statistics_are_reused_without_extraction(tmp_path):
    real, fake = smooth_images(20, seed=0), add_noise(smooth_images(12, seed=5), 20)
    stats_path = str(tmp_path / "ref_stats.npz")
    first = ev.evaluate(fake, real, feature_fn=CountingFeatures(), progress=False, save_stats=stats_path)
    assert set(ev.npz_keys(stats_path)) == {"mu", "sigma", "features", "from_features", "num_images", "sizes",
                                            "network"}
    counting = CountingFeatures()
    again = ev.evaluate(fake, stats_path, feature_fn=counting, progress=False)
    assert counting.seen == 12  # the samples only
    for key in ("fid", "precision", "recall"):
        assert again[key] == pytest.approx(first[key], rel=1e-6, abs=1e-12), key  # features stored as float32
    assert again["reference_sizes"] == first["reference_sizes"] == "16x16"
    assert again["num_reference"] == first["num_reference"] == 20

    class OtherNetwork(CountingFeatures):
        identity = "another network"
    with pytest.raises(ValueError, match="statistics of network 'counting mean colour'"):
        ev.evaluate(fake, stats_path, feature_fn=OtherNetwork(), progress=False)


def test_adm_reference_batch_with_stored_statistics(tmp_path):
    """An .npz holding mu/sigma beside arr_0 (ADM's VIRTUAL_imagenet256_labeled.npz layout): FID uses the
    stored statistics; the images are read only for precision/recall, and then compared with them."""
    real, fake = smooth_images(24, seed=1), smooth_images(10, seed=2)
    fn = CountingFeatures()
    own_mu, own_sigma = ev.feature_statistics(fn(real))
    stored_mu, stored_sigma = own_mu + 0.01, own_sigma * 1.1  # as if another network had made them
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=real, mu=stored_mu, sigma=stored_sigma)
    fake_mu, fake_sigma = ev.feature_statistics(fn(fake))

    fid_only = CountingFeatures()
    r = ev.evaluate(fake, str(path), feature_fn=fid_only, progress=False, with_precision_recall=False)
    assert fid_only.seen == 10 and r["precision"] is None and "reference_stored_fid" not in r
    assert r["fid"] == pytest.approx(ev.frechet_distance(stored_mu, stored_sigma, fake_mu, fake_sigma), rel=1e-9)
    assert r["num_reference"] == 24 and r["reference_sizes"] == "16x16"

    full = CountingFeatures()
    r2 = ev.evaluate(fake, str(path), feature_fn=full, progress=False)
    assert full.seen == 34 and r2["fid"] == pytest.approx(r["fid"], rel=1e-9)
    assert (r2["precision"], r2["recall"]) == ev.precision_recall(fn(real), fn(fake))
    assert r2["reference_stored_fid"] == pytest.approx(
        ev.frechet_distance(stored_mu, stored_sigma, own_mu, own_sigma), rel=1e-9)
    # saved for reuse: the stored statistics with our features beside them, FID still from the stored ones
    saved = str(tmp_path / "saved.npz")
    r4 = ev.evaluate(fake, str(path), feature_fn=CountingFeatures(), progress=False, save_stats=saved)
    reused = CountingFeatures()
    r5 = ev.evaluate(fake, saved, feature_fn=reused, progress=False)
    assert reused.seen == 10 and r5["fid"] == pytest.approx(r4["fid"], rel=1e-9) == r["fid"]
    assert (r5["precision"], r5["recall"]) == (r4["precision"], r4["recall"])
    assert not ev.read_statistics(saved).from_features and ev.read_statistics(saved).network == "counting mean colour"
    # a statistics-only file: FID, and precision/recall reported as not available
    np.savez(tmp_path / "stats_only.npz", mu=stored_mu, sigma=stored_sigma)
    r3 = ev.evaluate(fake, str(tmp_path / "stats_only.npz"), feature_fn=CountingFeatures(), progress=False)
    assert r3["fid"] == pytest.approx(r["fid"], rel=1e-9) and r3["precision"] is None and r3["reference_sizes"] is None


def test_cli_save_stats_then_reuse(tmp_path, extractor_path, capsys):
    a = save_npz(str(tmp_path / "a.npz"), smooth_images(16))
    b = save_npz(str(tmp_path / "b.npz"), add_noise(smooth_images(16), 25))
    stats = str(tmp_path / "a_stats.npz")
    args = ["--extractor", extractor_path, "--no-progress"]
    assert cli.eval_main([b, a, "--save-stats", stats] + args) == 0
    first = capsys.readouterr().out
    assert f"wrote {stats}" in first
    assert cli.eval_main([b, stats] + args) == 0
    assert capsys.readouterr().out.splitlines()[:3] == first.splitlines()[:3]
    assert cli.eval_main([b, stats, "--save-stats", str(tmp_path / "x.txt")] + args) == 2
    assert "--save-stats must name a .npz file" in capsys.readouterr().err


def test_size_mismatch_note(tmp_path, capsys):
    small, large = smooth_images(8, size=8), smooth_images(8, size=16)
    ev.evaluate(small, large, feature_fn=CountingFeatures(), progress=False)
    err = capsys.readouterr().err
    assert "note: samples are 8x8, reference images 16x16" in err and "network sees each at its own size" in err
    extractor = ev.TorchFeatureExtractor(TinyInception(), resize=12)
    ev.evaluate(small, large, feature_fn=extractor, progress=False)
    assert "both are resized to 12x12 for the network" in capsys.readouterr().err


def test_folder_of_mixed_sizes_batches_by_size(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = {f"{i}.png": smooth_images(1, size=8 + 4 * (i % 3), seed=i)[0] for i in range(7)}
    for i, (name, im) in enumerate(images.items()):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / name)
    (folder / "notes.txt").write_text("not an image")
    source = ev.ImageSource(str(folder))
    assert source.sizes == {(8, 8): 3, (12, 12): 2, (16, 16): 2} and len(source) == 7
    batches = list(source.batches(2))
    assert [b.shape[:3] for b in batches] == [(2, 8, 8), (1, 8, 8), (2, 12, 12), (2, 16, 16)]
    by_name = {os.path.basename(f): im for f, im in zip(source.files, (im for b in batches for im in b))}
    assert all(np.array_equal(by_name[n], im) for n, im in images.items())
    with pytest.raises(ValueError, match="differ in size"):
        ev.load_images(str(folder))


def test_npz_is_read_in_blocks(tmp_path):
    images = smooth_images(11, size=8)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, arr_0=images)
        blocks = list(ev.ImageSource(str(path)).batches(4))
        assert [len(b) for b in blocks] == [4, 4, 3] and np.array_equal(np.concatenate(blocks), images)
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        ev.ImageSource(str(tmp_path / "floats.npz"))
    damaged = (tmp_path / "savez_compressed.npz").read_bytes()
    (tmp_path / "damaged.npz").write_bytes(damaged[:len(damaged) // 2])
    with pytest.raises(ValueError, match="not a readable .npz file"):
        list(ev.ImageSource(str(tmp_path / "damaged.npz")).batches(4))
    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(ValueError, match="neither images"):
        ev.evaluate(str(tmp_path / "other.npz"), images, feature_fn=CountingFeatures(), progress=False)


def test_legacy_bilinear_resize_is_tf1_resize_bilinear():
    # TF1 ResizeBilinear (no half-pixel centres) of [a, b] to 4 pixels samples at 0, 0.5, 1, 1.5 -> clamped
    x = torch.tensor([[[[10.0, 30.0]]]])
    assert ev.legacy_bilinear_resize(x, (1, 4)).flatten().tolist() == [10.0, 20.0, 30.0, 30.0]
    # the same sampling expressed through grid_sample (normalised coordinates, border padding)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 13, 17, generator=g) * 255
    for size in ((29, 31), (7, 5), (13, 17)):
        ys = (2 * torch.arange(size[0]) * 13 / size[0] + 1) / 13 - 1
        xs = (2 * torch.arange(size[1]) * 17 / size[1] + 1) / 17 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).expand(2, -1, -1, -1).float()
        expected = torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                                                   align_corners=False)
        torch.testing.assert_close(ev.legacy_bilinear_resize(img, size), expected, atol=2e-3, rtol=0)


def test_training_fid_is_repeatable_and_tracks_the_weights(tmp_path):
    from dip.models import build_model
    torch.manual_seed(0)
    model = build_model("DiP-Tiny", hidden_size=32, num_heads=2, depth=1, num_classes=2, head="none")
    meter = ev.TrainingFID(smooth_images(12), num_samples=6, num_classes=2, image_size=16, steps=2, batch_size=4,
                           feature_fn=CountingFeatures())
    assert meter.labels.tolist() == [0, 1, 0, 1, 0, 1]
    first = meter(model)
    assert meter(model) == first and np.isfinite(first) and first > 0  # fixed classes and noises
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    assert meter(model) != first
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.TrainingFID(smooth_images(4), num_samples=1, num_classes=2, image_size=16, feature_fn=CountingFeatures())
