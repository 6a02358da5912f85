"""Training data: an image folder with the ADM centre crop, an in-memory dataset, and a resumable,
rank-sharded batch sampler.

Sample order is a pure function of ``(seed, epoch)``, so a run can be resumed at any batch from
just the epoch and the index within the epoch, and every process agrees on the global batch
without communicating. Samples are addressed as ``(dataset_index, flip)`` so the random flip is
decided by the sampler too (deterministic across ranks and DataLoader workers).
"""
import multiprocessing
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX filtering while the short side is at least twice the target
    (cheap and alias-free), then BICUBIC-resize the short side to ``image_size``, then crop the
    centre square. Returns an (image_size, image_size, 3) uint8 array."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image.convert("RGB"))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _split_index(item) -> Tuple[int, bool]:
    if isinstance(item, (tuple, list)):
        return int(item[0]), bool(item[1])
    return int(item), False


class ImageFolderDataset(Dataset):
    """Images under ``root``: one subfolder per class (labels follow sorted folder names), or images
    directly in ``root`` for unconditional data (a single class 0).

    An unreadable image is replaced by the next readable one, with a warning; :meth:`fetch` returns
    how many reads failed for an item (the trainer counts those of the batches it consumes), and
    ``num_failures`` counts every failed read in any process (DataLoader prefetch included). A class
    folder without images, or data of which no image can be read, raises DataError."""

    def __init__(self, root: str, image_size: int, random_flip: bool = False):
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist or is not a directory")
        self.root = root
        self.image_size = int(image_size)
        self.random_flip = random_flip
        entries = sorted(os.listdir(root))
        class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
        top_images = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_image(e)]
        self.samples: List[Tuple[str, int]] = []
        if class_dirs and not top_images:
            self.classes = class_dirs
            empty = []
            for label, name in enumerate(class_dirs):
                found = []
                for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                    dirnames.sort()
                    found += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if _is_image(f)]
                if not found:
                    empty.append(name)
                self.samples += found
            if empty and self.samples:
                # it would take a label and never be trained: most often a copy that went wrong
                raise DataError(f"data folder {root!r}: {len(empty)} class folders hold no images "
                                f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); "
                                "remove them or add images")
        else:
            self.classes = [os.path.basename(os.path.normpath(root))]
            self.samples = [(os.path.join(root, f), 0) for f in top_images]
        if not self.samples:
            raise ValueError(f"data folder {root!r} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                             "either directly in it or in one subfolder per class)")
        self._failures = multiprocessing.get_context().Value("i", 0)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_failures(self) -> int:
        return int(self._failures.value)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> np.ndarray:
        path = self.samples[index][0]
        with Image.open(path) as img:
            img.load()
            return center_crop_arr(img.convert("RGB"), self.image_size)

    def fetch(self, item) -> Tuple[torch.Tensor, int, int]:
        """(image, label, failed reads): item ``(index, flip)``, or the next readable image after it."""
        index, flip = _split_index(item)
        n = len(self.samples)
        failed = []
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                arr = self._load(i)
            except Exception as err:  # corrupt files must not kill a long run mid-epoch
                with self._failures.get_lock():
                    self._failures.value += 1
                failed.append(f"{self.samples[i][0]!r}: {err}")
                continue
            for failure in failed:  # warned only once a replacement is found: if none is, one error line
                warnings.warn(f"skipping unreadable image {failure}", RuntimeWarning)
            if flip and self.random_flip:
                arr = arr[:, ::-1]
            return uint8_to_tensor(arr), self.samples[i][1], len(failed)
        raise DataError(f"none of the {n} images under {self.root!r} could be read (the first, {failed[0]})")

    def __getitem__(self, item):
        image, label, _ = self.fetch(item)
        return image, label


class InMemoryImageDataset(Dataset):
    """A dataset from a list of (3, H, W) float tensors in [-1, 1] (or one (N, 3, H, W) tensor),
    with optional integer labels (default: all 0, one class)."""

    def __init__(self, images, labels: Optional[Sequence[int]] = None, random_flip: bool = False,
                 num_classes: Optional[int] = None):
        self.images = [img.detach().float().cpu() for img in images]
        if not self.images:
            raise ValueError("images must be a non-empty list of (3, H, W) tensors")
        for i, img in enumerate(self.images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"images[{i}] must have shape (3, H, W), got {tuple(img.shape)}")
        self.labels = [0] * len(self.images) if labels is None else [int(v) for v in labels]
        if len(self.labels) != len(self.images):
            raise ValueError(f"labels has {len(self.labels)} entries for {len(self.images)} images")
        self.random_flip = random_flip
        self._num_classes = num_classes if num_classes is not None else max(self.labels) + 1
        self.num_failures = 0

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, flip = _split_index(item)
        img = self.images[index]
        if flip and self.random_flip:
            img = img.flip(-1)
        return img, self.labels[index]


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen)
    return torch.stack([perm, flips], dim=1)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch as a list of ``(dataset_index, flip)``.

    The stream is the concatenation of per-epoch shuffles (an epoch is one pass over the data; a
    batch may span two epochs, so any dataset size works with any batch size). Global batch k holds
    stream items ``[k*B, (k+1)*B)``; rank r of W takes the r-th contiguous slice of B/W of them, so the
    union over ranks is exactly the batch a single process would see."""

    def __init__(self, dataset_size: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, index: int = 0, shuffle: bool = True):
        if dataset_size < 1:
            raise ValueError("dataset_size must be positive")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global_batch ({global_batch}) must be a positive multiple of the world size ({world_size})")
        self.n, self.global_batch, self.rank, self.world_size = dataset_size, global_batch, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.set_position(epoch, index)

    def set_position(self, epoch: int, index: int):
        """Continue with the global batch starting at item ``index`` of epoch ``epoch``."""
        if not 0 <= index < self.n:
            raise ValueError(f"index must be in [0, {self.n}), got {index}")
        self.epoch, self.index = int(epoch), int(index)

    def _order(self, epoch):
        if self.shuffle:
            return _epoch_order(self.n, self.seed, epoch)
        return torch.stack([torch.arange(self.n), torch.zeros(self.n, dtype=torch.long)], dim=1)

    def __len__(self):
        return 2 ** 62  # endless; the trainer counts steps

    def __iter__(self):
        local = self.global_batch // self.world_size
        start = self.rank * local
        epoch, index = self.epoch, self.index
        order = self._order(epoch)
        while True:
            rows = []
            while sum(len(r) for r in rows) < self.global_batch:
                take = min(self.global_batch - sum(len(r) for r in rows), self.n - index)
                rows.append(order[index:index + take])
                index += take
                if index == self.n:
                    epoch, index = epoch + 1, 0
                    order = self._order(epoch)
            batch = torch.cat(rows)[start:start + local]
            yield [(int(i), int(f)) for i, f in batch]


def advance_position(epoch: int, index: int, dataset_size: int, items: int) -> Tuple[int, int]:
    """The (epoch, index) reached after ``items`` more samples from (epoch, index). DataLoader workers
    prefetch, so the trainer tracks what it consumed with this rather than asking the sampler."""
    offset = index + items
    return epoch + offset // dataset_size, offset % dataset_size


class CountReadFailures(Dataset):
    """``dataset`` with items ``(image, label, failed reads)``: from its ``fetch`` where it has one
    (ImageFolderDataset), else 0 failures."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        if hasattr(self.dataset, "fetch"):
            return self.dataset.fetch(item)
        image, label = self.dataset[item]
        return image, label, 0


def collate(batch):
    """(images, labels, failed reads summed) from ``(image, label[, failed reads])`` items."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels, sum(int(b[2]) if len(b) > 2 else 0 for b in batch)
