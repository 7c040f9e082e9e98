"""ResNet-18 from torchvision with a `num_classes` head and a choice of stem."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raybench.configs import ResNetConfig
from raybench.models.hub import WeightsUnavailable, reachable
from raybench.models.registry import Complexity, Family, register


# torchvision is imported where a ResNet is built or its weights are looked up, not with this module: its import
# pulls in torch._dynamo, which the grid's driver would load for nothing in a study without a ResNet (a trial
# process loads it anyway, with its optimizer). docs/benchmarks.md has what it costs.

def imagenet_weights():
    from torchvision.models import ResNet18_Weights
    return ResNet18_Weights.IMAGENET1K_V1


def torchvision_weights_path(weights=None) -> Path:
    """Where torchvision keeps (and looks for) the downloaded weights: $TORCH_HOME/hub/checkpoints/<file>.
    `weights`: a torchvision weights enum member; ResNet-18's ImageNet weights by default."""
    weights = weights or imagenet_weights()
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def weights_unavailable(weights=None, what: str = "ResNet-18 ImageNet",
                        instead: str = "resnet18-cifar / resnet18-imagenet") -> WeightsUnavailable | None:
    """Why torchvision's `weights` can be neither read from its cache nor downloaded, else None. The message
    names the model (`what`) and what trains without them (`instead`)."""
    weights = weights or imagenet_weights()
    path = torchvision_weights_path(weights)
    if not path.exists() and not reachable(weights.url):
        # torchvision would otherwise fail deep inside urllib; say what to do instead.
        return WeightsUnavailable(
            f"{what} weights are not cached at {path} and {weights.url} cannot be reached. "
            f"Copy the file there (or set TORCH_HOME to a folder whose hub/checkpoints/ holds it), "
            f"or train from scratch with {instead}.")
    return None


def pretrained_state(weights=None) -> dict:
    """torchvision's `weights` (ResNet-18's ImageNet ones by default) as a state dict, from its cache or
    downloaded; refused with instructions when neither can be had."""
    weights = weights or imagenet_weights()
    err = weights_unavailable(weights)
    if err:
        raise err
    # check_hash covers a download only; a file already in the cache loads unchecked, so weights_only=True keeps
    # a planted pickle from running.
    return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)


def build_resnet(cfg: ResNetConfig, weights: bool = True) -> nn.Module:
    """`weights=False`: a pretrained config's architecture with random weights (complexity needs no download)."""
    from torchvision.models import resnet18
    model = resnet18()
    if cfg.pretrained:
        if weights:
            model.load_state_dict(pretrained_state())
        model.fc = nn.Linear(model.fc.in_features, cfg.num_classes)
    else:
        model = resnet18(num_classes=cfg.num_classes)
    if cfg.stem == "cifar":
        # 32x32 inputs: a 7x7/2 conv plus max-pool would shrink them to 8x8 before the first block.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    t = imagenet_weights().transforms()
    model.input_size = cfg.image_size
    model.mean, model.std = (tuple(t.mean), tuple(t.std)) if cfg.pretrained else (None, None)
    return model


# --- closed-form complexity (torchvision BasicBlock layout) ------------------------------------------------

def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def resnet18_complexity(c: ResNetConfig) -> Complexity:
    S = c.image_size
    params, macs = 0, {"stem": 0, "blocks": 0, "downsample": 0, "head": 0}
    if c.stem == "cifar":
        S = _conv_out(S, 3, 1, 1)
        macs["stem"] = S * S * 3 * 64 * 9
        params += 3 * 64 * 9 + 2 * 64
    else:
        S = _conv_out(S, 7, 2, 3)
        macs["stem"] = S * S * 3 * 64 * 49
        params += 3 * 64 * 49 + 2 * 64
        S = _conv_out(S, 3, 2, 1)  # max-pool
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stride = 2 if (stage > 0 and b == 0) else 1
            S_out = _conv_out(S, 3, stride, 1)
            macs["blocks"] += S_out * S_out * 9 * (cin * cout + cout * cout)
            params += 9 * (cin * cout + cout * cout) + 2 * 2 * cout
            if stride != 1 or cin != cout:  # 1x1 projection shortcut + its BatchNorm
                macs["downsample"] += S_out * S_out * cin * cout
                params += cin * cout + 2 * cout
            S, cin = S_out, cout
    macs["head"] = 512 * c.num_classes
    params += 512 * c.num_classes + c.num_classes
    flops = {k: 2 * v for k, v in macs.items()}
    trainable = params
    return Complexity(c.name, params, trainable, sum(flops.values()), c.image_size, flops)


register(Family(ResNetConfig, build_resnet, closed_form=resnet18_complexity, feature_dim=lambda c: 512,  # pooled
                weights_problem=lambda c: weights_unavailable() if c.pretrained else None,
                columns={"stem": lambda c: c.stem}))
