"""The model flags `python -m raybench.train` and `python -m raybench.complexity` share: a model from the
command line, named (`--name`) or configured by family (`--model vit --patch 4 ...`), checked before it is used."""
from __future__ import annotations

import json

from raybench.configs import (PREFIXES, SWIN_SHORT, ConfigError, ModelConfig, ResNetConfig, SwinConfig, ViTConfig,
                              model_from_name, parse_model_name, usual_image_size)
from raybench.experiments import locate
from raybench.models import check_model


def add_model_args(p) -> None:
    p.add_argument("--model", choices=["vit", "resnet", "swin"],
                   help="family, configured by the flags below (or give --name)")
    p.add_argument("--name", help="a model name instead: vit-p4-e256-l8-h2-m2, resnet18-cifar, swin-tiny-ft, ..., "
                   "or torchvision:<arch>, hf:<checkpoint or folder>, py:<module>:<function>")
    p.add_argument("--patch", type=int, default=8, help="ViT patch size (default: 8)")
    p.add_argument("--dim", type=int, default=256, help="ViT embedding dim (default: 256)")
    p.add_argument("--depth", type=int, default=4, help="ViT encoder blocks (default: 4)")
    p.add_argument("--heads", type=int, default=2, help="ViT attention heads (default: 2)")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="ViT MLP hidden / dim (default: 2)")
    p.add_argument("--dropout", type=float, default=0.0, help="ViT dropout (default: 0)")
    p.add_argument("--image-size", type=int, default=32, help="ViT/ResNet input side (default: 32)")
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar", help="ResNet stem (default: cifar)")
    p.add_argument("--pretrained", action="store_true",
                   help="ResNet, torchvision:<arch>: torchvision's ImageNet weights (224 px unless --image-size)")
    p.add_argument("--checkpoint", default=SWIN_SHORT["tiny"],
                   help=f"Swin hub name or local save_pretrained folder (default: {SWIN_SHORT['tiny']})")
    p.add_argument("--scratch", action="store_true",
                   help="Swin, hf:<checkpoint>: train from scratch, everything trainable")
    p.add_argument("--finetune", action="store_true",
                   help="hf:<checkpoint>, py:<module>:<function>: freeze the backbone, train only the head")
    p.add_argument("--kwargs", default="{}",
                   help='py:<module>:<function>: keyword arguments as JSON, e.g. \'{"width": 64}\' (default: {})')
    p.add_argument("--num-classes", type=int, default=100, help="classes (default: 100)")


def _prefixed_from_args(args) -> ModelConfig:
    family = args.name.partition(":")[0]
    if family == "torchvision":
        fields = {"pretrained": args.pretrained,
                  "image_size": None if args.image_size == 32 else args.image_size}
    elif family == "hf":  # an hf model trains at its checkpoint's size: --image-size does not apply
        fields = {"finetune": args.finetune, "scratch": args.scratch}
    else:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--kwargs={args.kwargs!r}: not JSON ({e}); e.g. '{{\"width\": 64}}'") from None
        fields = {"kwargs": kwargs, "image_size": args.image_size, "finetune": args.finetune}
    return locate(model_from_name(args.name, fields, args.num_classes))


def model_from_args(args) -> ModelConfig:
    """The model the flags describe, checked (`check_model`: a torchvision:, hf: or py: model is built once and
    runs a test batch, so bad input fails here, not mid-trial) and completed (an hf: checkpoint's input size)."""
    return check_model(_model_from_args(args))


def _model_from_args(args) -> ModelConfig:
    source = (args.name or "").partition(":")[0]
    if args.finetune and source not in ("hf", "py"):
        raise ConfigError("--finetune applies to hf:<checkpoint> and py:<module>:<function> names (Swin: "
                          "swin-<size>-ft is fine-tuned, --scratch trains it from scratch)")
    if args.kwargs != "{}" and source != "py":
        raise ConfigError(f"--kwargs={args.kwargs!r} applies to py:<module>:<function> names only")
    if args.name:
        if source in PREFIXES:
            return _prefixed_from_args(args)
        return parse_model_name(args.name, num_classes=args.num_classes, image_size=args.image_size)
    if args.model == "vit":
        return ViTConfig(args.patch, args.dim, args.depth, args.heads, args.mlp_ratio, args.dropout,
                         image_size=args.image_size, num_classes=args.num_classes)
    if args.model == "resnet":
        size = usual_image_size(args.pretrained) if args.image_size == 32 else args.image_size
        stem = "imagenet" if args.pretrained else args.stem
        return ResNetConfig(stem, args.pretrained, image_size=size, num_classes=args.num_classes)
    if args.model == "swin":
        return SwinConfig(args.checkpoint, finetune=not args.scratch, num_classes=args.num_classes)
    raise ConfigError("no model given: pass --model vit|resnet|swin (with its flags) or --name NAME")
