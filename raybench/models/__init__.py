"""One entry point for every family: `build_model(config)` returns a module mapping images to logits.

Each model carries `input_size` (the side it expects; the trainer resizes to it) and `mean`/`std`
(None: normalise with the dataset's own statistics; else the pretrained weights' statistics).
"""
from __future__ import annotations

from torch import nn

from raybench.configs import ModelConfig, ResNetConfig, SwinConfig, ViTConfig
from raybench.models.hub import WeightsUnavailable  # noqa: F401  (re-exported for callers)


def build_model(cfg: ModelConfig, weights: bool = True) -> nn.Module:
    """`weights=False`: pretrained configs get their architecture with random weights (for complexity checks)."""
    if isinstance(cfg, ViTConfig):
        from raybench.models.vit import ViT
        model = ViT(cfg)
        model.input_size, model.mean, model.std = cfg.image_size, None, None
    elif isinstance(cfg, ResNetConfig):
        from raybench.models.resnet import build_resnet
        from torchvision.models import ResNet18_Weights
        model = build_resnet(cfg, weights)
        t = ResNet18_Weights.IMAGENET1K_V1.transforms()
        model.input_size = cfg.image_size
        model.mean, model.std = (tuple(t.mean), tuple(t.std)) if cfg.pretrained else (None, None)
    elif isinstance(cfg, SwinConfig):
        from raybench.models.swin import build_swin
        model = build_swin(cfg, weights)
    else:
        raise TypeError(f"build_model: unsupported config {cfg!r}")
    return model


def check_weights(cfg: ModelConfig) -> None:
    """Raise WeightsUnavailable now if building `cfg` would need pretrained weights that cannot be had."""
    err = None
    if isinstance(cfg, ResNetConfig) and cfg.pretrained:
        from raybench.models.resnet import weights_unavailable
        err = weights_unavailable()
    elif isinstance(cfg, SwinConfig) and cfg.finetune:
        from raybench.models.swin import hub_unavailable
        err = hub_unavailable(cfg.checkpoint)
    if err:
        raise err
