"""Swin Transformers: the Hugging Face classifier path (raybench.models.hf) with Swin presets, so Swin-Tiny and
Small from scratch and their complexity figures need no download. Fine-tuned: pretrained weights, a new head, a
frozen backbone; from scratch: the architecture with random weights."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from raybench.configs import SWIN_ARCHS, SWIN_MICRO, ConfigError, SwinConfig
from raybench.models import hf
from raybench.models.hub import WeightsUnavailable, local_folder
from raybench.models.registry import Complexity, Family, register

LOADER = "SwinForImageClassification"


def check_checkpoint(cfg: SwinConfig) -> SwinConfig:
    """From scratch, the architecture comes from the built-in presets or a folder's config.json."""
    folder = local_folder(cfg.checkpoint)
    if not cfg.finetune and cfg.checkpoint not in SWIN_ARCHS and not (folder and Path(folder, "config.json").is_file()):
        raise ConfigError(f"SwinConfig.checkpoint={cfg.checkpoint!r}: from-scratch Swin needs a known "
                          f"architecture ({', '.join(SWIN_ARCHS)}) or a local folder with config.json")
    return cfg


def hub_unavailable(checkpoint: str) -> WeightsUnavailable | None:
    """Why `checkpoint` can be neither read from the cache nor downloaded, or None when it can be loaded."""
    if checkpoint == SWIN_MICRO:
        return None
    return hf.hub_unavailable(checkpoint, "Swin", LOADER)


def arch(cfg: SwinConfig) -> dict:
    """The architecture fields of a Swin config: a preset for the study's checkpoints, else config.json."""
    if cfg.checkpoint in SWIN_ARCHS:
        return dict(SWIN_ARCHS[cfg.checkpoint])
    from transformers import SwinConfig as HFSwinConfig
    err = hub_unavailable(cfg.checkpoint)
    if err:
        raise err
    try:
        h = HFSwinConfig.from_pretrained(os.path.expanduser(cfg.checkpoint))
    except OSError as e:
        raise WeightsUnavailable(f"Swin checkpoint {cfg.checkpoint!r}: its config.json cannot be read "
                                 f"({str(e).splitlines()[0]}); built-in: {', '.join(SWIN_ARCHS)}, or a folder "
                                 "written by save_pretrained") from None
    return dict(embed_dim=h.embed_dim, depths=tuple(h.depths), num_heads=tuple(h.num_heads),
                window_size=h.window_size, patch_size=h.patch_size, image_size=h.image_size,
                mlp_ratio=h.mlp_ratio)


def _hf_config(cfg: SwinConfig):
    from transformers import SwinConfig as HFSwinConfig
    if cfg.checkpoint in SWIN_ARCHS:
        a = SWIN_ARCHS[cfg.checkpoint]
        return HFSwinConfig(**{**a, "depths": list(a["depths"]), "num_heads": list(a["num_heads"])},
                            num_labels=cfg.num_classes)
    return HFSwinConfig.from_pretrained(os.path.expanduser(cfg.checkpoint), num_labels=cfg.num_classes)


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


def build_swin(cfg: SwinConfig, weights: bool = True) -> hf.HFClassifier:
    """`weights=False` builds the same architecture with random weights (complexity checks need no download)."""
    if cfg.finetune and weights:
        checkpoint = random_checkpoint(SWIN_MICRO) if cfg.checkpoint == SWIN_MICRO else cfg.checkpoint
        model = hf.load_pretrained(checkpoint, cfg.num_classes, "Swin", LOADER)
    else:
        from transformers import SwinForImageClassification
        model = SwinForImageClassification(_hf_config(cfg))
    # the random micro Swin has no preprocessor config: ImageNet's statistics, as the microsoft/swin-* use
    return hf.classifier(model, cfg.finetune, int(model.config.image_size),
                         None if cfg.checkpoint == SWIN_MICRO else cfg.checkpoint)


# --- closed-form complexity (Hugging Face SwinForImageClassification layout) ----------------------------------

def swin_complexity(c: SwinConfig) -> Complexity:
    a = arch(c)
    P, S, w0 = a["patch_size"], a["image_size"], a["window_size"]
    C = a["embed_dim"]
    R = S // P  # token grid side after patch embedding
    params = (3 * P * P * C + C) + 2 * C  # patch conv + its LayerNorm
    macs = {"embed": R * R * 3 * P * P * C, "attn_qkv": 0, "attn_matmul": 0, "attn_proj": 0, "mlp": 0,
            "merge": 0, "head": 0}
    n_stages = len(a["depths"])
    for i, (depth, heads) in enumerate(zip(a["depths"], a["num_heads"])):
        w = min(w0, R)  # HF shrinks the window to the resolution when the map is smaller than a window
        Rp = math.ceil(R / w) * w  # attention runs on the map padded to whole windows
        hidden = int(a["mlp_ratio"] * C)
        N, Np = R * R, Rp * Rp
        params += depth * (2 * C + (3 * C * C + 3 * C) + (2 * w - 1) ** 2 * heads + (C * C + C) + 2 * C
                           + (C * hidden + hidden) + (hidden * C + C))
        macs["attn_qkv"] += depth * Np * 3 * C * C
        macs["attn_matmul"] += depth * 2 * Np * w * w * C
        macs["attn_proj"] += depth * Np * C * C
        macs["mlp"] += depth * 2 * N * C * hidden
        if i < n_stages - 1:  # patch merging: LayerNorm(4C) + Linear(4C -> 2C, no bias)
            params += 2 * 4 * C + 4 * C * 2 * C
            R = (R + 1) // 2
            macs["merge"] += R * R * 4 * C * 2 * C
            C *= 2
    head = C * c.num_classes + c.num_classes
    params += 2 * C + head  # final LayerNorm + classifier
    macs["head"] = C * c.num_classes
    flops = {k: 2 * v for k, v in macs.items()}
    return Complexity(c.name, params, head if c.frozen_backbone else params, sum(flops.values()), S, flops)


def feature_dim(c: SwinConfig) -> int:
    a = arch(c)
    return a["embed_dim"] * 2 ** (len(a["depths"]) - 1)  # pooled width after the last stage


register(Family(SwinConfig, build_swin, closed_form=swin_complexity, feature_dim=feature_dim,
                check=check_checkpoint, weights_problem=lambda c: hub_unavailable(c.checkpoint) if c.finetune else None,
                columns={"swin_size": lambda c: c.short}))
