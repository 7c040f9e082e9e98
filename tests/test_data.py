import time

import pytest
import torch
from PIL import Image

from raybench.configs import DataSpec
from raybench.data import DatasetUnavailable, load_dataset, prepare, synthetic


def test_synthetic_has_cifar_shape_and_is_deterministic():
    a, b = synthetic(300, 100), synthetic(300, 100)
    assert a.train_x.shape == (300, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.num_classes == 100 and a.synthetic
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, synthetic(300, 100, seed=1).train_x)


def test_missing_cifar_fails_fast_with_a_way_out(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailable, match="--data-dir.*--dataset synthetic"):
        load_dataset(DataSpec("cifar100", data_dir=str(tmp_path)))
    assert time.perf_counter() - t0 < 10


def test_image_folder_takes_classes_from_folders_and_resizes(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200)), ("eel", (30, 200, 30))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (48 + i, 40), colour).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset(DataSpec("imagefolder", data_dir=str(tmp_path)), image_size=32)
    assert d.num_classes == 3 and d.train_x.shape == (12, 3, 32, 32) and d.test_x.shape == (6, 3, 32, 32)
    assert d.train_x[d.train_y == 0][:, 0].float().mean() > 150  # 'cat' is red


def test_image_folder_without_test_split_is_rejected(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetUnavailable, match="missing .*test"):
        load_dataset(DataSpec("imagefolder", data_dir=str(tmp_path)))


def test_augmentation_is_batched_and_keeps_shape():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    g = torch.Generator().manual_seed(0)
    plain = prepare(x, mean, std)
    aug = prepare(x, mean, std, augment=("crop", "flip"), generator=g)
    assert aug.shape == plain.shape and not torch.equal(aug, plain)
    # A crop is a shifted window of the padded image: every augmented row comes from the original batch
    # or from the zero padding.
    assert torch.isclose(aug.abs().sum(), plain.abs().sum(), rtol=0.3)
    assert prepare(x, mean, std, size=64).shape == (8, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown \\['mixup'\\]"):
        prepare(x, mean, std, augment=("mixup",))
