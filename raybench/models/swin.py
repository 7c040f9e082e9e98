"""Swin Transformers from Hugging Face: pretrained with a new head and a frozen backbone, or from scratch."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from raybench.configs import SWIN_ARCHS, SWIN_MICRO, ConfigError, SwinConfig
from raybench.models.hub import WeightsUnavailable, hf_unavailable

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SwinClassifier(nn.Module):
    """Images -> logits, like every raybench model; hides HF's output object from the trainer."""

    def __init__(self, hf_model, frozen: bool):
        super().__init__()
        self.hf = hf_model
        self.frozen = frozen
        if frozen:
            for p in self.hf.swin.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            # A frozen backbone stays in eval mode: no drop-path noise, and its features can be cached.
            self.hf.swin.eval()
        return self

    def forward_features(self, x):  # (B, 3, S, S) -> (B, C) pooled
        return self.hf.swin(pixel_values=x).pooler_output

    def forward_head(self, f):
        return self.hf.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def check_checkpoint(cfg: SwinConfig) -> None:
    """From scratch, the architecture comes from the built-in presets or a folder's config.json."""
    if (not cfg.finetune and cfg.checkpoint not in SWIN_ARCHS
            and not (Path(os.path.expanduser(cfg.checkpoint)) / "config.json").is_file()):
        raise ConfigError(f"SwinConfig.checkpoint={cfg.checkpoint!r}: from-scratch Swin needs a known "
                          f"architecture ({', '.join(SWIN_ARCHS)}) or a local folder with config.json")


def _is_local(checkpoint: str) -> bool:
    return Path(os.path.expanduser(checkpoint)).is_dir()


def _hf_config(cfg: SwinConfig):
    from transformers import SwinConfig as HFSwinConfig
    if cfg.checkpoint in SWIN_ARCHS:
        arch = SWIN_ARCHS[cfg.checkpoint]
        return HFSwinConfig(**{**arch, "depths": list(arch["depths"]), "num_heads": list(arch["num_heads"])},
                            num_labels=cfg.num_classes)
    return HFSwinConfig.from_pretrained(os.path.expanduser(cfg.checkpoint), num_labels=cfg.num_classes)


def load_pretrained(checkpoint: str, num_classes: int):
    """`SwinForImageClassification.from_pretrained` with the classifier replaced for `num_classes`.

    The local cache (or folder) is tried first; the network only when it can be reached, so an offline
    machine fails in seconds with instructions instead of hanging in retries."""
    from transformers import SwinForImageClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per shard and per load buries the study's own progress lines
    if checkpoint == SWIN_MICRO:
        checkpoint = random_checkpoint(SWIN_MICRO)
    path = os.path.expanduser(checkpoint)
    kw = dict(num_labels=num_classes, ignore_mismatched_sizes=True)
    if _is_local(path):
        return SwinForImageClassification.from_pretrained(path, **kw)
    try:
        return SwinForImageClassification.from_pretrained(checkpoint, local_files_only=True, **kw)
    except OSError:
        pass
    err = hub_unavailable(checkpoint)
    if err:
        raise err
    return SwinForImageClassification.from_pretrained(checkpoint, **kw)


def hub_unavailable(checkpoint: str) -> WeightsUnavailable | None:
    """Why `checkpoint` can be neither read from the cache nor downloaded, or None when it can be loaded."""
    if checkpoint == SWIN_MICRO:
        return None
    return hf_unavailable(checkpoint, "Swin", "SwinForImageClassification")


def random_checkpoint(checkpoint: str) -> str:
    """A save_pretrained folder of a built-in Swin architecture with random weights, written once per machine:
    the micro Swin's stand-in "pretrained" weights, and the benchmark's offline Swin-Tiny/Small."""
    from filelock import FileLock
    from transformers import SwinForImageClassification
    root = Path(os.environ.get("RAYBENCH_CACHE", Path.home() / ".cache" / "raybench"))
    path = root / ("random-" + checkpoint.replace("/", "--"))
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # trials packed on one machine may race to write it
        if not (path / "config.json").exists():
            with torch.random.fork_rng():  # the caller's seeded RNG stream stays as it was
                torch.manual_seed(0)
                model = SwinForImageClassification(_hf_config(SwinConfig(checkpoint, finetune=False)))
            model.save_pretrained(path)
    return str(path)


def preprocessing(checkpoint: str, hf_config) -> tuple[int, tuple, tuple]:
    """(image_size, mean, std) the checkpoint was trained with, read from its preprocessor config when present."""
    size, mean, std = int(hf_config.image_size), IMAGENET_MEAN, IMAGENET_STD
    try:
        from transformers import AutoImageProcessor
        if checkpoint == SWIN_MICRO:
            raise LookupError("random micro Swin: no preprocessor config")
        proc = AutoImageProcessor.from_pretrained(os.path.expanduser(checkpoint), local_files_only=True)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:
        pass  # the microsoft/swin-* checkpoints use ImageNet statistics, and tiny test folders carry none
    return size, mean, std


def build_swin(cfg: SwinConfig, weights: bool = True) -> SwinClassifier:
    """`weights=False` builds the same architecture with random weights (complexity checks need no download)."""
    if cfg.finetune and weights:
        hf = load_pretrained(cfg.checkpoint, cfg.num_classes)
    else:
        from transformers import SwinForImageClassification
        hf = SwinForImageClassification(_hf_config(cfg))
    model = SwinClassifier(hf, frozen=cfg.finetune)
    model.input_size, model.mean, model.std = preprocessing(cfg.checkpoint, hf.config)
    return model
