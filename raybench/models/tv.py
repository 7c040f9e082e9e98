"""Any torchvision classification model by name, with its head replaced for `num_classes`."""
from __future__ import annotations

from torch import nn

from raybench.configs import ConfigError, TorchvisionConfig
from raybench.models.hub import WeightsUnavailable
from raybench.models.registry import Family, register
from raybench.models.resnet import pretrained_state, weights_unavailable

AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}  # training-only side heads


def check_arch(cfg: TorchvisionConfig) -> TorchvisionConfig:
    """Refuse an arch that is not one of torchvision's classification models, naming close matches."""
    import difflib
    import torchvision
    archs = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if cfg.arch not in archs:
        close = difflib.get_close_matches(str(cfg.arch), archs, n=5, cutoff=0.5)
        raise ConfigError(f"TorchvisionConfig.arch={cfg.arch!r}: not a torchvision classification model; "
                          + (f"close matches: {', '.join(close)}" if close else
                             f"{len(archs)} are, e.g. {', '.join(archs[:6])} (see "
                             "torchvision.models.list_models(module=torchvision.models))"))
    return cfg


def default_weights(arch: str):
    import torchvision
    w = torchvision.models.get_model_weights(arch)
    return w.DEFAULT if hasattr(w, "DEFAULT") else next(iter(w))


def weights_problem(cfg: TorchvisionConfig) -> WeightsUnavailable | None:
    return weights_unavailable(default_weights(cfg.arch), what=f"torchvision {cfg.arch}",
                               instead=f"torchvision:{cfg.arch} without pretrained")


def _builder_kwargs(cfg: TorchvisionConfig) -> dict:
    """What torchvision's builders set themselves when given weights, so the architecture is the weights' one
    whether or not they are loaded; from scratch, the model is sized for cfg.image_size where it takes one."""
    if cfg.pretrained:
        w = default_weights(cfg.arch)
        kw = {"num_classes": len(w.meta["categories"])}
        if cfg.arch in AUX_HEADS:
            kw.update(transform_input=True, aux_logits=True, init_weights=False)
        if cfg.arch.startswith("vit_"):
            kw["image_size"] = w.meta["min_size"][0]
        if cfg.arch == "maxvit_t":
            kw["input_size"] = w.meta["min_size"]
        return kw
    kw = {"num_classes": cfg.num_classes}
    if cfg.arch in AUX_HEADS:
        kw.update(aux_logits=False, init_weights=True)
    if cfg.arch.startswith("vit_"):
        kw["image_size"] = cfg.image_size
    if cfg.arch == "maxvit_t":
        kw["input_size"] = (cfg.image_size, cfg.image_size)
    return kw


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """The last Linear (or 1x1 Conv, as in SqueezeNet) producing `old_classes` outputs becomes a fresh one."""
    found = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == old_classes) or (
                isinstance(m, nn.Conv2d) and m.out_channels == old_classes):
            found = name, m
    if found is None:
        raise ConfigError(f"torchvision model {type(model).__name__}: no Linear or Conv2d layer with "
                          f"{old_classes} outputs to replace with a {num_classes}-class head")
    name, m = found
    parent = model.get_submodule(name.rpartition(".")[0])
    new = (nn.Linear(m.in_features, num_classes) if isinstance(m, nn.Linear) else
           nn.Conv2d(m.in_channels, num_classes, m.kernel_size, m.stride, m.padding))
    setattr(parent, name.rpartition(".")[2], new)


def build_torchvision(cfg: TorchvisionConfig, weights: bool = True) -> nn.Module:
    """`weights=False`: a pretrained config's architecture with random weights (complexity needs no download)."""
    import torchvision
    kw = _builder_kwargs(cfg)
    model = torchvision.models.get_model(cfg.arch, weights=None, **kw)
    model.input_size, model.mean, model.std = cfg.image_size, None, None
    if not cfg.pretrained:
        return model
    w = default_weights(cfg.arch)
    if weights:
        err = weights_problem(cfg)
        if err:
            raise err
        model.load_state_dict(pretrained_state(w))  # weights_only=True, hash-checked on download
    for aux in AUX_HEADS.get(cfg.arch, ()):  # the side heads return a tuple in training; the study uses logits
        setattr(model, aux, None)
    if cfg.arch in AUX_HEADS:
        model.aux_logits = False
    replace_head(model, kw["num_classes"], cfg.num_classes)
    t = w.transforms()
    model.mean, model.std = tuple(t.mean), tuple(t.std)
    return model


register(Family(TorchvisionConfig, build_torchvision, check=check_arch, test_batch=True,
                weights_problem=lambda c: weights_problem(c) if c.pretrained else None))
