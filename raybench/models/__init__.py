"""One entry point for every family: `build_model(config)` returns a module mapping images to logits.

Each model carries `input_size` (the side it expects; the trainer resizes to it) and `mean`/`std`
(None: normalise with the dataset's own statistics; else the pretrained weights' statistics). Models with a
backbone/head split (Swin, hf:, py: models that define one) also carry `forward_features(x)` and
`forward_head(features)`, which the trainer uses to cache a frozen backbone's features.

Every family is registered by its own module (raybench.models.registry); nothing here asks which family a
config is.
"""
from __future__ import annotations

import functools

from torch import nn

from raybench.configs import ConfigError, ModelConfig
from raybench.models.hub import WeightsUnavailable  # noqa: F401  (re-exported for callers)
from raybench.models.registry import FAMILIES, Family, family_of  # noqa: F401  (re-exported for callers)

# The registered families: each module registers its own when imported here.
from raybench.models import vit  # noqa: E402,F401
from raybench.models import resnet  # noqa: E402,F401
from raybench.models import swin  # noqa: E402,F401
from raybench.models import tv  # noqa: E402,F401
from raybench.models import hf  # noqa: E402,F401
from raybench.models import py  # noqa: E402,F401


def build_model(cfg: ModelConfig, weights: bool = True) -> nn.Module:
    """`weights=False`: pretrained configs get their architecture with random weights (for complexity checks)."""
    return family_of(cfg).build(cfg, weights)


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
    err = family_of(cfg).weights_problem(cfg)
    if err:
        raise err


def _describe(out) -> str:
    if hasattr(out, "shape"):
        return f"a {type(out).__name__} of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}" + (f" of {len(out)} items" if isinstance(out, (tuple, list)) else "")


def check_model(cfg: ModelConfig) -> ModelConfig:
    """The config checked against what it names, and completed (an hf: checkpoint's input size): run when an
    experiment loads and by the CLIs, never by a config's construction. A torchvision:, hf: or py: model is
    also built once (random weights) and runs a test batch in train and eval mode: a model that does not build,
    or does not map (2, 3, S, S) to (2, classes) logits, is refused when the experiment loads, not in a trial.
    A frozen backbone must also give forward_head(forward_features(x)) == forward(x). An hf: checkpoint whose
    config cannot be read here is left to check_weights."""
    family = family_of(cfg)
    cfg = family.check(cfg)
    if not family.test_batch or cfg.image_size is None:
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
