"""One entry point for every family: `build_model(config)` returns a module mapping images to logits.

Each model carries `input_size` (the side it expects; the trainer resizes to it) and `mean`/`std`
(None: normalise with the dataset's own statistics; else the pretrained weights' statistics). Models with a
backbone/head split (Swin, hf:, py: models that define one) also carry `forward_features(x)` and
`forward_head(features)`, which the trainer uses to cache a frozen backbone's features.
"""
from __future__ import annotations

import functools

from torch import nn

from raybench.configs import (ConfigError, HFConfig, ModelConfig, PyConfig, ResNetConfig, SwinConfig,
                              TorchvisionConfig, ViTConfig)
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
    elif isinstance(cfg, TorchvisionConfig):
        from raybench.models.tv import build_torchvision
        model = build_torchvision(cfg, weights)
    elif isinstance(cfg, HFConfig):
        from raybench.models.hf import build_hf
        model = build_hf(cfg, weights)
    elif isinstance(cfg, PyConfig):
        from raybench.models.py import build_py
        model = build_py(cfg, weights)
    else:
        raise TypeError(f"build_model: unsupported config {cfg!r}")
    return model


@functools.lru_cache(maxsize=1)
def measuring_model(cfg: ModelConfig) -> nn.Module:
    """`cfg` built to be measured or checked: random weights, the caller's seeded RNG stream left as it was.
    The last one is kept, so the figures taken from one config in a row (the load-time test batch, counted FLOPs,
    feature width, training and evaluation memory) build it once. Callers set the mode they measure in."""
    import torch
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg, weights=False)


def check_weights(cfg: ModelConfig) -> None:
    """Raise WeightsUnavailable now if building `cfg` would need pretrained weights that cannot be had."""
    err = None
    if isinstance(cfg, ResNetConfig) and cfg.pretrained:
        from raybench.models.resnet import weights_unavailable
        err = weights_unavailable()
    elif isinstance(cfg, SwinConfig) and cfg.finetune:
        from raybench.models.swin import hub_unavailable
        err = hub_unavailable(cfg.checkpoint)
    elif isinstance(cfg, TorchvisionConfig) and cfg.pretrained:
        from raybench.models.tv import weights_problem
        err = weights_problem(cfg)
    elif isinstance(cfg, HFConfig):  # scratch too: its architecture is read from the checkpoint's config
        from raybench.models.hf import hub_unavailable as hf_hub_unavailable
        err = hf_hub_unavailable(cfg.checkpoint)
    if err:
        raise err


def _describe(out) -> str:
    if hasattr(out, "shape"):
        return f"a {type(out).__name__} of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}" + (f" of {len(out)} items" if isinstance(out, (tuple, list)) else "")


def _complete(cfg: ModelConfig) -> ModelConfig:
    """The checks a config's construction leaves out because they read files (torchvision's model list, an HF
    checkpoint's config, a Swin folder), and what those files decide (an hf: checkpoint's input size)."""
    if isinstance(cfg, TorchvisionConfig):
        from raybench.models.tv import check_arch
        check_arch(cfg)
    elif isinstance(cfg, HFConfig):
        from raybench.models.hf import with_image_size
        cfg = with_image_size(cfg)
    elif isinstance(cfg, SwinConfig):
        from raybench.models.swin import check_checkpoint
        check_checkpoint(cfg)
    return cfg


def check_model(cfg: ModelConfig) -> ModelConfig:
    """The config checked against what it names, and completed (an hf: checkpoint's input size): run when an
    experiment loads and by the CLIs, never by a config's construction. A torchvision:, hf: or py: model is
    also built once (random weights) and runs a test batch in train and eval mode: a model that does not build,
    or does not map (2, 3, S, S) to (2, classes) logits, is refused when the experiment loads, not in a trial.
    A frozen backbone must also give forward_head(forward_features(x)) == forward(x). An hf: checkpoint whose
    config cannot be read here is left to check_weights."""
    cfg = _complete(cfg)
    if not isinstance(cfg, (TorchvisionConfig, HFConfig, PyConfig)) or cfg.image_size is None:
        return cfg
    import torch
    try:
        model = measuring_model(cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{cfg.name}: building it fails: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    S, N = model.input_size, cfg.num_classes
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    for mode in ("train", "eval"):
        model.train(mode == "train")
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:
            raise ConfigError(f"{cfg.name}: a test batch of shape {tuple(x.shape)} fails in {mode} mode: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, N):
            raise ConfigError(f"{cfg.name}: a test batch of shape {tuple(x.shape)} gives {_describe(out)} in "
                              f"{mode} mode; expected logits of shape (2, {N}): (batch, classes)")
    if cfg.frozen_backbone:
        with torch.no_grad():
            split = model.forward_head(model.forward_features(x))
        if not torch.allclose(split, out, rtol=1e-4, atol=1e-5):
            raise ConfigError(f"{cfg.name}: forward_head(forward_features(x)) differs from forward(x) (by up to "
                              f"{(split - out).abs().max().item():.3g}): the frozen backbone's cached features "
                              "would train a different model")
    return cfg
