"""Datasets as uint8 tensors on the training device, and batches cut, augmented and normalised there.

No DataLoader, no workers, no per-sample PIL transforms in the hot loop: an epoch is a permutation of
indices and a few batched tensor ops per step (after airbench's CifarLoader).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from raybench.configs import DataSpec, Recipe

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000  # CIFAR-100's images per split, 32x32x3 uint8 each


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and cannot be downloaded; the message says how to provide it."""


@dataclass
class Dataset:
    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str
    synthetic: bool

    @property
    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel statistics of the training images, in [0, 1] units."""
        x = self.train_x[:10_000].float() / 255
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))

    def to(self, device) -> "Dataset":
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device))


def load_dataset(spec: DataSpec, num_classes: int | None = None, image_size: int = 32) -> Dataset:
    if spec.name == "synthetic":  # CIFAR-sized like CIFAR itself: models that want more resize per batch
        return synthetic(spec.train_size, spec.test_size, num_classes or 100)
    if spec.name == "cifar100":
        return cifar100(spec.data_dir, spec.download)
    return image_folder(spec.data_dir, image_size)


# --- synthetic --------------------------------------------------------------------------------------------

def synthetic(train_size: int = 50_000, test_size: int = 10_000, num_classes: int = 100, image_size: int = 32,
              seed: int = 0, noise: float = 80.0, mix: float = 0.35) -> Dataset:
    """A learnable stand-in for CIFAR-100: each class is a smooth colour pattern (a random 4x4x3 grid,
    upsampled); each image is its class's pattern blended with a random other class's (weight `mix`),
    shifted by up to 3 pixels, rescaled in contrast and buried in pixel noise. Models must learn the
    patterns; chance is 1/num_classes. Deterministic given `seed`."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 3, 4, 4, generator=g) * 200 + 28
    protos = F.interpolate(protos, size=(image_size, image_size), mode="bicubic", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes  # balanced classes, shuffled below
        y = y[torch.randperm(n, generator=g)]
        x = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
        for s in range(0, n, 4096):  # chunks keep the float temporaries small
            yc = y[s:s + 4096]
            other = torch.randint(0, num_classes, (len(yc),), generator=g)
            img = (1 - mix) * protos[yc] + mix * protos[other]
            shift = torch.randint(-3, 4, (2,), generator=g).tolist()
            img = torch.roll(img, shifts=shift, dims=(2, 3))
            contrast = torch.rand(len(yc), 1, 1, 1, generator=g) * 0.6 + 0.7
            img = (img - 128) * contrast + 128 + torch.randn(img.shape, generator=g) * noise
            x[s:s + 4096] = img.clamp_(0, 255).round_().to(torch.uint8)
        return x, y

    train_x, train_y = make(train_size)
    test_x, test_y = make(test_size)
    return Dataset(train_x, train_y, test_x, test_y, num_classes, "synthetic", True)


# --- CIFAR-100 --------------------------------------------------------------------------------------------

def _cifar_root(data_dir: str | None) -> Path:
    return Path(os.path.expanduser(data_dir or "data")).resolve()


def _cifar_unavailable(root: Path, download: bool) -> DatasetUnavailable | None:
    """Why CIFAR-100 can be neither read from `root` nor downloaded, or None when one of them will work."""
    from raybench.models.hub import reachable
    if (root / "cifar-100-python").is_dir() or (download and reachable(CIFAR_URL)):
        return None
    why = "downloads are off (download: false)" if not download else f"{CIFAR_URL} cannot be reached"
    return DatasetUnavailable(
        f"CIFAR-100 is not in {root} (expected {root / 'cifar-100-python'}) and {why}. "
        f"Put an extracted copy of cifar-100-python.tar.gz there and pass --data-dir {root}, or run "
        f"offline with --dataset synthetic.")


def cifar100(data_dir: str | None, download: bool = True) -> Dataset:
    import torchvision
    root = _cifar_root(data_dir)

    def load(dl: bool):
        return [torchvision.datasets.CIFAR100(str(root), train=t, download=dl) for t in (True, False)]

    try:
        train, test = load(False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        err = _cifar_unavailable(root, download) if not (root / "cifar-100-python").is_dir() else None
        if err or not download:
            raise err or DatasetUnavailable(f"CIFAR-100 in {root} is unreadable and downloads are off") from None
        # Trials packed on one machine start together: one downloads and extracts, the others wait for it and
        # then read its copy, instead of writing the same archive at once.
        from filelock import FileLock
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".cifar-100-download.lock")):
            try:
                train, test = load(False)
            except RuntimeError:
                print(f"[data] downloading CIFAR-100 into {root} ...", flush=True)
                train, test = load(True)

    def tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    (train_x, train_y), (test_x, test_y) = tensors(train), tensors(test)
    return Dataset(train_x, train_y, test_x, test_y, 100, "cifar100", False)


def check_available(spec: DataSpec) -> None:
    """Raise DatasetUnavailable now if a trial could not load this data: a cheap look at the disk and the
    network, so the grid refuses before it starts Ray instead of failing every trial."""
    if spec.name == "cifar100":
        err = _cifar_unavailable(_cifar_root(spec.data_dir), spec.download)
        if err:
            raise err
    elif spec.name == "imagefolder":
        root = Path(os.path.expanduser(spec.data_dir))
        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise DatasetUnavailable(f"image folder {root}: missing {root / split}/ "
                                         "(expected train/<class>/* and test/<class>/*)")


# --- the user's own images --------------------------------------------------------------------------------

def image_folder(root: str, image_size: int = 32) -> Dataset:
    """`root/train/<class>/*` and `root/test/<class>/*`, resized to `image_size`; classes from the folders."""
    import torchvision
    from torchvision.transforms import v2
    root_p = Path(os.path.expanduser(root))
    check_available(DataSpec("imagefolder", data_dir=root))
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])
    splits = [torchvision.datasets.ImageFolder(str(root_p / s), transform=tf) for s in ("train", "test")]
    if splits[0].classes != splits[1].classes:
        raise DatasetUnavailable(f"image folder {root_p}: train classes {splits[0].classes} differ from "
                                 f"test classes {splits[1].classes}")

    def tensors(ds):  # one pass at load time; nothing per-sample happens during training
        xs = [ds[i][0][:3].expand(3, -1, -1) for i in range(len(ds))]
        return torch.stack(xs).to(torch.uint8), torch.tensor(ds.targets)

    (train_x, train_y), (test_x, test_y) = tensors(splits[0]), tensors(splits[1])
    return Dataset(train_x, train_y, test_x, test_y, len(splits[0].classes), "imagefolder", False)


# --- batches on the device --------------------------------------------------------------------------------

AUGMENTS = Recipe.AUGMENTS


def batch_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding (zero = the mean colour after normalising): image i becomes the window
    at rows dy[i]:dy[i]+H, columns dx[i]:dx[i]+W of `F.pad(x, (pad,) * 4)`, offsets in [0, 2 * pad]. One
    padded copy of the batch, windows gathered by index arithmetic (no per-image loop)."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    return xp[torch.arange(B, device=x.device)[:, None, None, None],
              torch.arange(C, device=x.device)[None, :, None, None], rows, cols]


def batch_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images where `mask` (B,) is true, mirrored left to right; the others as they are."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def prepare(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int | None = None,
            augment: tuple[str, ...] = (), generator: torch.Generator | None = None, pad: int = 4):
    """uint8 (B, 3, H, W) -> normalised float batch, augmented and resized as asked, all as batched ops.

    The random draws, from `generator` in this order: crop rows, crop columns (`randint(0, 2 * pad + 1, (B,))`
    each), then the flip mask (`rand(B) < 0.5`); a seeded trial's numbers depend on that order."""
    bad = set(augment) - AUGMENTS
    if bad:
        raise ValueError(f"augment={list(augment)}: unknown {sorted(bad)}; accepted: {sorted(AUGMENTS)}")
    x = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    B, _, H, W = x.shape
    if "crop" in augment:
        dy = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=generator)
        x = batch_crop(x, dy, dx, pad)
    if "flip" in augment:
        x = batch_flip(x, torch.rand(B, device=x.device, generator=generator) < 0.5)
    if size is not None and size != H:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < H)
    return x


def epoch_indices(n: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """A shuffled epoch as index batches (the last one may be short)."""
    perm = torch.randperm(n, generator=generator, device=device)
    return list(perm.split(batch_size))
