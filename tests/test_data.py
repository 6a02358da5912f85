import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dip.data import (ImageFolderDataset, InMemoryImageDataset, ResumableBatchSampler, advance_position,
                      center_crop_arr)


def _write(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_center_crop_shape_and_box_halving():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8))
    arr = center_crop_arr(img, 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    # a constant image stays constant through BOX halving + BICUBIC resize + crop
    flat = Image.fromarray(np.full((130, 90, 3), 77, np.uint8))
    assert (center_crop_arr(flat, 32) == 77).all()
    # the crop is centred: a bright centre stripe in a wide image survives in the middle
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 40:56] = 255
    out = center_crop_arr(Image.fromarray(wide), 32)
    assert out[:, 12:20].mean() > 250 and out[:, :4].mean() < 5


def test_image_folder_classes_range_and_flip(tmp_path):
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / c)
        for i in range(2):
            _write(tmp_path / c / f"{i}.png", 40, 50, seed=i)
    ds = ImageFolderDataset(str(tmp_path), 32, random_flip=True)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    flipped, _ = ds[(3, 1)]
    torch.testing.assert_close(flipped, x.flip(-1))


def test_unconditional_folder(tmp_path):
    for i in range(3):
        _write(tmp_path / f"{i}.jpg", 20, 20, seed=i)
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert len(ds) == 3 and ds.num_classes == 1
    assert all(ds[i][1] == 0 for i in range(3))


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 16)
    os.makedirs(tmp_path / "empty" / "class_a")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"), 16)


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    _write(tmp_path / "a.png", 20, 20)
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    _write(tmp_path / "c.png", 20, 20, seed=3)
    ds = ImageFolderDataset(str(tmp_path), 16)
    with pytest.warns(RuntimeWarning, match="unreadable image"):
        x, y = ds[1]  # b.png -> replaced by the next readable image, c.png
    torch.testing.assert_close(x, ds[2][0])
    assert ds.num_failures == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = [ds[i] for i in range(len(ds))]
    assert len(batch) == 3 and ds.num_failures == 2


def test_in_memory_dataset():
    imgs = [torch.rand(3, 8, 8) * 2 - 1 for _ in range(3)]
    ds = InMemoryImageDataset(imgs, labels=[0, 2, 1], random_flip=True)
    assert ds.num_classes == 3 and len(ds) == 3
    torch.testing.assert_close(ds[(1, 1)][0], imgs[1].flip(-1))
    assert ds[(1, 0)][1] == 2
    with pytest.raises(ValueError, match="labels"):
        InMemoryImageDataset(imgs, labels=[0])


def test_sampler_shards_union_to_the_global_batch_and_resumes():
    n, batch = 10, 4
    single = ResumableBatchSampler(n, batch, seed=5)
    ranks = [ResumableBatchSampler(n, batch, rank=r, world_size=2, seed=5) for r in range(2)]
    it1, its = iter(single), [iter(s) for s in ranks]
    batches = []
    for _ in range(7):  # crosses epoch boundaries (10 is not a multiple of 4)
        b = next(it1)
        batches.append(b)
        assert b == next(its[0]) + next(its[1])
    # every epoch is a permutation
    stream = [i for b in batches for i, _ in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    # resuming after 3 batches gives the 4th
    epoch, index = advance_position(0, 0, n, 3 * batch)
    assert (epoch, index) == (1, 2)
    resumed = ResumableBatchSampler(n, batch, seed=5, epoch=epoch, index=index)
    assert next(iter(resumed)) == batches[3]


def test_sampler_batch_larger_than_dataset():
    b = next(iter(ResumableBatchSampler(3, 8, seed=0)))
    assert len(b) == 8 and {i for i, _ in b} == {0, 1, 2}
