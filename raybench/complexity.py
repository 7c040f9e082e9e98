"""Parameter counts and forward FLOPs per image, in closed form from a model config, with measured cross-checks.

Convention: FLOPs = 2 x multiply-accumulates (MACs) of the matrix work: convolutions, linear layers and the
attention matmuls (QK^T and AV). Element-wise work (norms, activations, softmax, residual adds, pooling,
biases) is left out, as in `torch.utils.flop_counter.FlopCounterMode`, which the tests hold the formulas to.

Nothing here loads pretrained weights: Swin figures come from the architecture config alone. Models from the
study's dependencies (torchvision:, hf:, py:) have no closed form: their figures are counted on the built model
(random weights) and marked `flops_source = "counted"`.

    python -m raybench.complexity --model vit --patch 8 --dim 256 --depth 4 --heads 2 --mlp-ratio 2 --json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field

from raybench.configs import (PREFIXES, SWIN_ARCHS, ConfigError, ModelConfig, ResNetConfig, SwinConfig, ViTConfig,
                              parse_model_name, study_models)
from raybench.flags import add_model_args, model_from_args

CLOSED_FORM, COUNTED = "closed form", "counted"  # Complexity.flops_source


@dataclass(frozen=True)
class Complexity:
    name: str
    params: int
    trainable_params: int
    flops: int  # forward FLOPs for one image (2 x MACs)
    input_size: int
    flops_by_part: dict = field(default_factory=dict)
    flops_source: str = CLOSED_FORM  # or COUNTED: FlopCounterMode on the built model

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


# --- ViT ------------------------------------------------------------------------------------------------

def vit_complexity(c: ViTConfig) -> Complexity:
    D, H, N, C, P = c.dim, c.mlp_hidden, c.num_patches, c.num_classes, c.patch
    T = N + 1  # tokens: patches + class token
    block_params = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)
    params = (3 * P * P * D + D) + D + T * D + c.depth * block_params + 2 * D + (D * C + C)
    macs = {
        "embed": N * 3 * P * P * D,
        "attn_qkv": c.depth * T * D * 3 * D,
        "attn_matmul": c.depth * 2 * T * T * D,  # QK^T and AV, summed over heads
        "attn_proj": c.depth * T * D * D,
        "mlp": c.depth * 2 * T * D * H,
        "head": D * C,
    }
    flops = {k: 2 * v for k, v in macs.items()}
    return Complexity(c.name, params, params, sum(flops.values()), c.image_size, flops)


# --- ResNet-18 (torchvision BasicBlock layout) -----------------------------------------------------------

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


# --- Swin (Hugging Face SwinForImageClassification layout) -----------------------------------------------

def swin_arch(c: SwinConfig) -> dict:
    """The architecture fields of a Swin config: built in for the study's checkpoints, else config.json."""
    if c.checkpoint in SWIN_ARCHS:
        return dict(SWIN_ARCHS[c.checkpoint])
    from transformers import SwinConfig as HFSwinConfig
    from raybench.models.hub import WeightsUnavailable
    from raybench.models.swin import hub_unavailable
    err = hub_unavailable(c.checkpoint)
    if err:
        raise err
    try:
        h = HFSwinConfig.from_pretrained(os.path.expanduser(c.checkpoint))
    except OSError as e:
        raise WeightsUnavailable(f"Swin checkpoint {c.checkpoint!r}: its config.json cannot be read "
                                 f"({str(e).splitlines()[0]}); built-in: {', '.join(SWIN_ARCHS)}, or a folder "
                                 "written by save_pretrained") from None
    return dict(embed_dim=h.embed_dim, depths=tuple(h.depths), num_heads=tuple(h.num_heads),
                window_size=h.window_size, patch_size=h.patch_size, image_size=h.image_size,
                mlp_ratio=h.mlp_ratio)


def swin_complexity(c: SwinConfig) -> Complexity:
    a = swin_arch(c)
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


# --- any other model: counted on the built model ------------------------------------------------------------

def count_flops(model, input_size: int) -> dict:
    """Forward FLOPs per image by operator: raybench's one FlopCounterMode count, as design.md's conventions say:
    under the math SDPA backend (the fused CPU kernel counts 0) and in train mode (nn.MultiheadAttention's eval
    fast path is partly missed). Batch 2, halved: BatchNorm in train mode needs more than one value per channel.
    The model's mode is restored; its BatchNorm statistics move (pass a model built for counting)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.train()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
            model(torch.zeros(2, 3, input_size, input_size))
    finally:
        model.train(was_training)
    by_op = fc.get_flop_counts().get("Global", {})
    return {getattr(op, "__name__", str(op)): n // 2 for op, n in by_op.items()}  # aten.convolution -> convolution


@functools.lru_cache(maxsize=None)
def counted_complexity(cfg: ModelConfig) -> Complexity:
    """Parameters (total and trainable) and FLOPs counted on the built model, random weights: no download."""
    from raybench.models import measuring_model
    model = measuring_model(cfg)
    by_op = count_flops(model, model.input_size)
    return Complexity(cfg.name, sum(p.numel() for p in model.parameters()),
                      sum(p.numel() for p in model.parameters() if p.requires_grad), sum(by_op.values()),
                      model.input_size, by_op, COUNTED)


def complexity(cfg: ModelConfig) -> Complexity:
    if isinstance(cfg, ViTConfig):
        return vit_complexity(cfg)
    if isinstance(cfg, ResNetConfig):
        return resnet18_complexity(cfg)
    if isinstance(cfg, SwinConfig):
        return swin_complexity(cfg)
    if cfg.family in PREFIXES:
        return counted_complexity(cfg)
    raise TypeError(f"complexity: unsupported config {cfg!r}")


# --- measured counts, for cross-checks --------------------------------------------------------------------

def measure(model, input_size: int) -> dict:
    """Counted on the built model: parameters, FLOPs (count_flops) and torchinfo mult-adds for one image.
    torchinfo only sees modules' own weights (Conv/Linear), so it misses the attention matmuls, which are
    functional calls; it runs in eval mode, the model's mode restored."""
    import torchinfo
    import torch
    flops = sum(count_flops(model, input_size).values())
    was_training = model.training
    model.eval()
    try:
        info = torchinfo.summary(model, input_data=torch.zeros(1, 3, input_size, input_size), verbose=0)
    finally:
        model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "flops": int(flops), "torchinfo_mult_adds": int(info.total_mult_adds)}


# --- CLI --------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.complexity", description=(
        "Closed-form parameters and forward FLOPs per image (FLOPs = 2 x MACs, attention matmuls included). "
        "With no model given, prints every model of the study."))
    p.add_argument("names", nargs="*", help="model names (vit-p4-e256-l8-h2-m2, resnet18-cifar, swin-tiny-ft) "
                   "or experiment names/files (smoke, seed, full)")
    add_model_args(p)
    p.add_argument("--measure", action="store_true",
                   help="also build each model and report FlopCounterMode FLOPs and torchinfo mult-adds")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return p


def _configs_from_args(args) -> list[ModelConfig]:
    if args.model or args.name:
        return [model_from_args(args)]
    if not args.names:
        return study_models(args.num_classes)
    out: list[ModelConfig] = []
    for n in args.names:
        try:
            cfg = parse_model_name(n, num_classes=args.num_classes, image_size=args.image_size)
        except ConfigError as bad_name:
            from raybench.experiments import load_experiment, resolve_path  # an experiment name or file
            try:
                resolve_path(n)
            except FileNotFoundError:
                raise ConfigError(f"{bad_name}; nor is {n!r} an experiment name or file") from None
            seen = {c.name for c in out}
            for spec in load_experiment(n).trials:
                if spec.model.name not in seen:
                    seen.add(spec.model.name)
                    out.append(spec.model)
            continue
        from raybench.models import check_model  # torchvision:, hf:, py: names: a test batch first
        out.append(check_model(cfg))
    return out


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        configs = _configs_from_args(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and ExperimentError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    from raybench.models.hub import WeightsUnavailable
    rows = []
    for cfg in configs:
        try:
            cx = complexity(cfg)
        except WeightsUnavailable as e:
            print(f"error: {cfg.name}: {e}", file=sys.stderr)
            return 2
        row = {"model": cx.name, "params": cx.params, "trainable_params": cx.trainable_params,
               "flops": cx.flops, "gflops": round(cx.gflops, 4), "input_size": cx.input_size,
               "flops_by_part": cx.flops_by_part, "flops_source": cx.flops_source}
        if args.measure:
            from raybench.models import build_model
            m = measure(build_model(cfg, weights=False), cx.input_size)
            row.update({f"measured_{k}": v for k, v in m.items()})
        rows.append(row)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print("FLOPs = 2 x multiply-accumulates per image, forward pass; attention QK^T and AV included. "
          "FLOPs from: closed form (the study's families) or counted (FlopCounterMode on the built model).")
    head = f"{'model':<36}{'params':>14}{'trainable':>14}{'GFLOPs':>10}{'input':>7}{'FLOPs from':>13}"
    if args.measure:
        head += f"{'counted GFLOPs':>16}{'torchinfo GMACs':>17}"
    print(head)
    for r in rows:
        line = (f"{r['model']:<36}{r['params']:>14,}{r['trainable_params']:>14,}{r['gflops']:>10.3f}"
                f"{r['input_size']:>7}{r['flops_source']:>13}")
        if args.measure:
            line += f"{r['measured_flops'] / 1e9:>16.3f}{r['measured_torchinfo_mult_adds'] / 1e9:>17.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
