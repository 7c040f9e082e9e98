"""Any Hugging Face image classifier (`AutoModelForImageClassification`), head replaced for `num_classes`:
pretrained, pretrained with a frozen backbone, or the checkpoint's architecture from scratch. The one classifier
wrapper (HFClassifier) and loading path every HF model takes, Swin's presets (raybench.models.swin) included."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from torch import nn

from raybench.configs import ConfigError, HFConfig
from raybench.models.hub import WeightsUnavailable, hf_unavailable, local_folder
from raybench.models.registry import Family, register

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEADS = ("classifier", "head")  # where HF's image classifiers keep the final layer (ViT, DeiT, Swin, ConvNeXt...)


@functools.lru_cache(maxsize=None)
def read_config(checkpoint: str):
    """The checkpoint's config from its folder or the HF cache (never the network), else None. Raises
    ConfigError when it is not an image classifier AutoModelForImageClassification can build."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as NAMES
    try:
        cfg = AutoConfig.from_pretrained(local_folder(checkpoint) or checkpoint, local_files_only=True)
    except (OSError, ValueError) as e:
        if local_folder(checkpoint):  # a folder, but no readable config.json in it
            raise ConfigError(f"hf:{checkpoint}: the folder holds no readable config.json "
                              f"({str(e).splitlines()[0]}); write one with save_pretrained") from None
        return None
    if cfg.model_type not in NAMES:
        raise ConfigError(f"hf:{checkpoint}: a {cfg.model_type!r} model, not an image classifier; "
                          f"AutoModelForImageClassification builds {len(NAMES)} model types, e.g. "
                          f"{', '.join(sorted(NAMES)[:8])}, ...")
    return cfg


def _preprocessor(checkpoint: str | None) -> dict:
    """The checkpoint's preprocessor_config.json from its folder or the HF cache, else {}."""
    from transformers.utils import cached_file
    try:
        path = checkpoint and cached_file(local_folder(checkpoint) or checkpoint, "preprocessor_config.json",
                                          local_files_only=True, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # not cached, or not a hub id at all
        path = None
    return json.loads(Path(path).read_text()) if path else {}


def _side(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    if isinstance(size, dict):
        return _side(size.get("height") if "height" in size else size.get("shortest_edge"))
    return None


@functools.lru_cache(maxsize=None)
def checkpoint_image_size(checkpoint: str) -> int | None:
    """The side the checkpoint was trained at (config.image_size, else its preprocessor's crop), None when
    its config cannot be read here."""
    cfg = read_config(checkpoint)
    if cfg is None:
        return None
    size = _side(getattr(cfg, "image_size", None))
    if size is None:
        pre = _preprocessor(checkpoint)
        size = _side(pre.get("crop_size")) or _side(pre.get("size"))
    if size is None:
        raise ConfigError(f"hf:{checkpoint}: neither its config nor its preprocessor says a square image size "
                          f"(config.image_size={getattr(cfg, 'image_size', None)!r})")
    return size


def with_image_size(cfg: HFConfig) -> HFConfig:
    """The config with its checkpoint's input size: the checkpoint decides it. An id neither cached nor local
    leaves it unknown here; the grid's preflight refuses such a model before Ray starts (check_weights)."""
    size = checkpoint_image_size(cfg.checkpoint)
    if size is not None and cfg.image_size not in (None, size):
        raise ConfigError(f"HFConfig.image_size={cfg.image_size}: {cfg.checkpoint} is trained at {size} "
                          "px and raybench trains it there; leave image_size out")
    return cfg if size is None else dataclasses.replace(cfg, image_size=size)


def hub_unavailable(checkpoint: str, what: str = "Hugging Face",
                    loader: str = "AutoModelForImageClassification") -> WeightsUnavailable | None:
    return hf_unavailable(checkpoint, what, loader)


class HFClassifier(nn.Module):
    """Images -> logits like every raybench model. `forward_features` is what HF's classifier layer receives
    (pooled features or the class token, whatever the model gives it), `forward_head` that layer."""

    def __init__(self, hf_model, frozen: bool):
        super().__init__()
        self.hf = hf_model
        self.frozen = frozen
        self.head_name = next((n for n in HEADS if isinstance(getattr(hf_model, n, None), nn.Module)), None)
        if frozen:
            if self.head_name is None:
                raise ConfigError(f"{type(hf_model).__name__} has none of the layers {HEADS} that raybench "
                                  "keeps trainable over a frozen backbone; drop finetune to train every weight")
            for p in self.hf.parameters():
                p.requires_grad_(False)
            for p in self.head.parameters():
                p.requires_grad_(True)

    @property
    def head(self) -> nn.Module:
        return getattr(self.hf, self.head_name)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode: no dropout noise, and its features can be cached
            self.hf.eval()
            self.head.train(mode)
        return self

    def forward_features(self, x):
        if self.head_name is None:
            raise AttributeError(f"{type(self.hf).__name__} has no classifier layer to split at")
        seen = []
        hook = self.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            self.hf(pixel_values=x)  # the head's own (tiny) cost is paid and thrown away
        finally:
            hook.remove()
        return seen[-1]

    def forward_head(self, f):
        return self.head(f)

    def forward(self, x):
        return self.hf(pixel_values=x).logits


def architecture(checkpoint: str, num_classes: int):
    """The checkpoint's config (folder or cache) with a `num_classes` head: its own labels go."""
    conf = read_config(checkpoint)
    if conf is None:
        err = hub_unavailable(checkpoint)
        raise err or WeightsUnavailable(f"hf:{checkpoint}: its config is not in the Hugging Face cache")
    fields = {k: v for k, v in conf.to_dict().items() if k not in ("id2label", "label2id")}
    return type(conf).from_dict({**fields, "num_labels": num_classes})


def load_pretrained(checkpoint: str, num_classes: int, what: str = "Hugging Face",
                    loader: str = "AutoModelForImageClassification"):
    """`from_pretrained` with the classifier replaced for `num_classes`; the folder or cache first, the network
    only when it can be reached (an offline machine fails at once, with instructions naming `what` and `loader`)."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per shard and per load buries the study's own progress lines
    local = local_folder(checkpoint)
    if local or read_config(checkpoint) is not None:  # in the folder or the cache
        return AutoModelForImageClassification.from_pretrained(
            local or checkpoint, config=architecture(checkpoint, num_classes), ignore_mismatched_sizes=True,
            local_files_only=not local)
    err = hub_unavailable(checkpoint, what, loader)
    if err:
        raise err
    return AutoModelForImageClassification.from_pretrained(checkpoint, num_labels=num_classes,
                                                           ignore_mismatched_sizes=True)


def classifier(hf_model, frozen: bool, input_size: int, checkpoint: str | None) -> HFClassifier:
    """The HF model wrapped, with the input side and the statistics its weights were trained with: the
    checkpoint's preprocessor's where it has one, else ImageNet's (the checkpoints raybench names use them)."""
    model = HFClassifier(hf_model, frozen)
    pre = _preprocessor(checkpoint)
    model.input_size = input_size
    model.mean = tuple(pre.get("image_mean", IMAGENET_MEAN))
    model.std = tuple(pre.get("image_std", IMAGENET_STD))
    return model


def build_hf(cfg: HFConfig, weights: bool = True) -> HFClassifier:
    """`weights=False` (or scratch): the checkpoint's architecture with random weights."""
    from transformers import AutoModelForImageClassification
    if cfg.scratch or not weights:
        hf = AutoModelForImageClassification.from_config(architecture(cfg.checkpoint, cfg.num_classes))
    else:
        hf = load_pretrained(cfg.checkpoint, cfg.num_classes)
    return classifier(hf, cfg.finetune, cfg.image_size or checkpoint_image_size(cfg.checkpoint), cfg.checkpoint)


# scratch too: its architecture is read from the checkpoint's config
register(Family(HFConfig, build_hf, check=with_image_size, test_batch=True,
                weights_problem=lambda c: hub_unavailable(c.checkpoint)))
