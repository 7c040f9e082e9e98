"""Parameter counts and forward FLOPs per image, in closed form from a model config, with measured cross-checks.
The closed forms live beside the models they describe (raybench/models/vit.py, resnet.py, swin.py), registered
with their family; this module picks the family's one or counts, and holds raybench's one FlopCounterMode count.

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
import sys

from raybench.configs import ConfigError, ModelConfig, parse_model_name, study_models
from raybench.flags import add_model_args, model_from_args
from raybench.models import family_of
from raybench.models.registry import CLOSED_FORM, COUNTED, Complexity  # noqa: F401  (re-exported)


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
    """The family's closed form where it has one, else counted on the built model."""
    closed_form = family_of(cfg).closed_form
    return closed_form(cfg) if closed_form else counted_complexity(cfg)


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
        from raybench.experiments import locate  # paths in names are taken from the working folder
        from raybench.models import check_model  # torchvision:, hf:, py: names: a test batch first
        out.append(check_model(locate(cfg)))
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
