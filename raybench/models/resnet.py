"""ResNet-18 from torchvision with a `num_classes` head and a choice of stem."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from raybench.configs import ResNetConfig
from raybench.models.hub import WeightsUnavailable, reachable


def torchvision_weights_path(weights=ResNet18_Weights.IMAGENET1K_V1) -> Path:
    """Where torchvision keeps (and looks for) the downloaded weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def weights_unavailable(weights=ResNet18_Weights.IMAGENET1K_V1, what: str = "ResNet-18 ImageNet",
                        instead: str = "resnet18-cifar / resnet18-imagenet") -> WeightsUnavailable | None:
    """Why torchvision's `weights` can be neither read from its cache nor downloaded, else None. The message
    names the model (`what`) and what trains without them (`instead`)."""
    path = torchvision_weights_path(weights)
    if not path.exists() and not reachable(weights.url):
        # torchvision would otherwise fail deep inside urllib; say what to do instead.
        return WeightsUnavailable(
            f"{what} weights are not cached at {path} and {weights.url} cannot be reached. "
            f"Copy the file there (or set TORCH_HOME to a folder whose hub/checkpoints/ holds it), "
            f"or train from scratch with {instead}.")
    return None


def _pretrained_state(weights=ResNet18_Weights.IMAGENET1K_V1) -> dict:
    err = weights_unavailable(weights)
    if err:
        raise err
    # check_hash covers a download only; a file already in the cache loads unchecked, so weights_only=True keeps
    # a planted pickle from running.
    return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)


def build_resnet(cfg: ResNetConfig, weights: bool = True) -> nn.Module:
    model = resnet18()
    if cfg.pretrained:
        if weights:
            model.load_state_dict(_pretrained_state())
        model.fc = nn.Linear(model.fc.in_features, cfg.num_classes)
    else:
        model = resnet18(num_classes=cfg.num_classes)
    if cfg.stem == "cifar":
        # 32x32 inputs: a 7x7/2 conv plus max-pool would shrink them to 8x8 before the first block.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
