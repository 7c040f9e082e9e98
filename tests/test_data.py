import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raybench.configs import DataSpec
from raybench.data import DatasetUnavailable, batch_crop, batch_flip, load_dataset, prepare, synthetic


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


def normalised(x, mean, std):
    return (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def test_flip_mirrors_exactly_the_masked_images():
    x = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch_flip(x, torch.ones(4, dtype=torch.bool)), x.flip(-1))
    assert torch.equal(batch_flip(x, torch.zeros(4, dtype=torch.bool)), x)
    mixed = batch_flip(x, torch.tensor([True, False, False, True]))
    assert torch.equal(mixed[[0, 3]], x[[0, 3]].flip(-1)) and torch.equal(mixed[[1, 2]], x[[1, 2]])


def test_crop_is_the_window_of_the_zero_padded_image_at_its_offsets():
    x, pad = torch.randn(5, 3, 8, 6, generator=torch.Generator().manual_seed(0)), 2
    # every corner of the offset range, and the centre (no shift)
    dy, dx = torch.tensor([0, 0, 4, 4, 2]), torch.tensor([0, 4, 0, 4, 2])
    padded = F.pad(x, (pad, pad, pad, pad))
    out = batch_crop(x, dy, dx, pad)
    assert out.shape == x.shape
    for i, (r, c) in enumerate(zip(dy.tolist(), dx.tolist())):
        assert torch.equal(out[i], padded[i, :, r:r + 8, c:c + 6]), (i, r, c)
    assert torch.equal(out[4], x[4])
    assert (out[0, :, :pad, :] == 0).all() and torch.equal(out[0, :, pad:, pad:], x[0, :, :-pad, :-pad])


def test_augmentation_crops_then_flips_with_the_generators_draws_in_order():
    """A seeded trial's numbers depend on the draw order: crop rows, crop columns, then the flip mask."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    plain = prepare(x, mean, std)
    assert torch.equal(plain, normalised(x, mean, std))
    g = torch.Generator().manual_seed(0)
    aug = prepare(x, mean, std, augment=("crop", "flip"), generator=g)
    draws = torch.Generator().manual_seed(0)
    dy, dx = (torch.randint(0, 2 * 4 + 1, (8,), generator=draws) for _ in range(2))  # prepare's default pad=4
    mask = torch.rand(8, generator=draws) < 0.5
    assert torch.equal(aug, batch_flip(batch_crop(plain, dy, dx, 4), mask))
    assert torch.equal(g.get_state(), draws.get_state())  # nothing else drawn
    assert 0 < int(mask.sum()) < 8 and (dy != 4).any()  # this seed both flips and shifts: the check has teeth
    assert aug.shape == plain.shape and not torch.equal(aug, plain)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(prepare(x, mean, std, augment=("flip",), generator=g),
                       batch_flip(plain, torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5))
    assert prepare(x, mean, std, size=64).shape == (8, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown \\['mixup'\\]"):
        prepare(x, mean, std, augment=("mixup",))
