"""A trial's size, in one place: the side its model sees, its backbone's feature width, whether it caches
features, its training and evaluation memory (measured on the built model, built once per config), and the
resource rule: what share of a GPU, and how many CPUs, it asks Ray for, and whether a cluster can ever hold it.
Written once, here, with its reasons; `python -m raybench.grid --dry-run` prints what it gives.

A trial's GPU fraction is the larger of two shares, rounded up to a power of two between MIN_FRACTION and 1
(powers of two so packed trials fill a GPU exactly):
- compute: training FLOPs per step over FULL_GPU_STEP_FLOPS, a step that keeps a whole GPU busy. A step is
  3 x forward FLOPs x batch (a forward plus a backward of about twice the forward); 1 x for a frozen backbone
  that runs every step (augmented images: no cache), since nothing flows back through it; and only the head's
  3 x (2 x features x classes) for a frozen backbone whose features are cached, because that is all its
  steps run (the one-off feature pass is charged in memory below, not as a steady share of compute).
- memory: trial_memory_bytes plus CUDA_OVERHEAD_BYTES, over the GPU's memory (--gpu-memory-gb; default the
  first CUDA device's, else DEFAULT_GPU_MEMORY_GB).
Tune does not split GPU memory: on CUDA each trial caps its allocator at its share less CUDA_OVERHEAD_BYTES
(torch.cuda.set_per_process_memory_fraction; the CUDA context lives outside the allocator), so a packed neighbour
cannot starve it, and a trial whose share of the real GPU is below its estimate fails at once (allocator_fraction).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from raybench.configs import ConfigError, ModelConfig, TrialSpec

FULL_GPU_STEP_FLOPS = 1e12  # a guess until the GPU check calibrates it (scripts/gpu-check.sh)
CUDA_OVERHEAD_BYTES = 1.0e9  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack
DEFAULT_GPU_MEMORY_GB = 80.0
MIN_FRACTION = 1 / 8
EVAL_BATCH = 256  # batch of the evaluation (and of the feature pass on CUDA)
CACHE_ON, CACHE_OFF_AUGMENT, CACHE_OFF_NOT_FROZEN, CACHE_OFF_DISABLED = (
    "on", "off: augmentation", "off: not a frozen backbone", "off: disabled")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def dataset_images(spec: TrialSpec) -> tuple[int, int]:
    """(images, side) the trial holds on its device as uint8. CIFAR-100 and the synthetic set are 32 px
    images, kept at 32 and resized per batch; an image folder is loaded at the model's own input side."""
    from raybench.data import CIFAR_TEST, CIFAR_TRAIN
    d = spec.data
    if d.name == "synthetic":
        return d.train_size + d.test_size, 32
    if d.name == "cifar100":
        return CIFAR_TRAIN + CIFAR_TEST, 32
    return count_images(Path(d.data_dir).expanduser()), input_side(spec)


def count_images(root: Path) -> int:
    """Image files under root/train and root/test, counted by suffix (no file is opened)."""
    n = 0
    for split in ("train", "test"):
        for _, _, files in os.walk(root / split):
            n += sum(f.lower().endswith(IMAGE_SUFFIXES) for f in files)
    return n


def input_side(spec: TrialSpec) -> int:
    """The side the model sees (the trainer resizes every batch to it)."""
    from raybench.complexity import complexity
    return complexity(spec.model).input_size


@functools.lru_cache(maxsize=None)
def feature_dim(cfg: ModelConfig) -> int:
    """Values per image of a backbone's features (what forward_features returns, what a frozen backbone's cache
    holds): the family's closed form where it has one (the ViT's class token, the pooled width of ResNet-18 and
    Swin), else measured on the built model."""
    from raybench.models import family_of, measuring_model
    closed_form = family_of(cfg).feature_dim
    if closed_form:
        return closed_form(cfg)
    import torch
    model = measuring_model(cfg).eval()
    if not callable(getattr(model, "forward_features", None)):
        raise ConfigError(f"{cfg.name}: no forward_features (backbone/head split), so no feature width")
    with torch.no_grad():
        f = model.forward_features(torch.zeros(2, 3, model.input_size, model.input_size))
    return f[0].numel()


@functools.lru_cache(maxsize=None)
def activation_bytes_per_image(cfg: ModelConfig) -> int:
    """Bytes autograd keeps for the backward pass per training image, measured: one forward of the built model
    (random weights) at batch 2 and 4 with a hook on every saved tensor, in fp32 (bf16 autocast on CUDA keeps
    about half). The difference divides out what does not grow with the batch (saved weights)."""
    import torch
    from raybench.models import measuring_model
    model = measuring_model(cfg).train()
    size = model.input_size

    def saved(batch: int) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros(batch, 3, size, size))
        return total
    return max(0, (saved(4) - saved(2)) // 2)


def feature_cache_mode(spec: TrialSpec, enabled: bool = True) -> str:
    """Whether the trial caches backbone features, or why not. A frozen backbone in eval mode maps each image
    to the same features every epoch, so they can be computed once; augmentation changes its input every epoch."""
    if not spec.model.frozen_backbone:
        return CACHE_OFF_NOT_FROZEN
    if spec.recipe.augment:
        return CACHE_OFF_AUGMENT
    return CACHE_ON if enabled else CACHE_OFF_DISABLED


def caches_features(spec: TrialSpec) -> bool:
    return feature_cache_mode(spec) == CACHE_ON


@functools.lru_cache(maxsize=None)
def inference_bytes_per_image(cfg) -> int:
    """Peak bytes a no-grad forward (evaluation, the feature pass) holds per image, measured on the built model
    at batch 1 in fp32: twice the largest inputs + outputs of any one leaf module (twice: the residual stream and
    the allocator's rounding live beside them). No-grad passes free each activation once the next layer has it."""
    import torch
    from raybench.models import measuring_model
    model = measuring_model(cfg).eval()
    peak = 0

    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (tuple, list)):
            return sum(size(o) for o in obj)
        if isinstance(obj, dict):
            return sum(size(o) for o in obj.values())
        return 0

    def hook(_module, inputs, output):
        nonlocal peak
        peak = max(peak, size(inputs) + size(output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    side = model.input_size
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in handles:
        h.remove()
    return 2 * peak


def trial_memory_bytes(spec: TrialSpec) -> int:
    """GPU memory one trial is estimated to use, the CUDA context aside: the training step (fp32 weights,
    gradients and Adam moments of what trains, the batch's saved activations) or the no-grad pass at
    EVAL_BATCH (evaluation, the feature pass), whichever is larger, plus what stays on the device all along:
    the dataset as uint8 and, for a cached frozen backbone, its fp32 features of every image."""
    from raybench.complexity import complexity
    cx = complexity(spec.model)
    images, side = dataset_images(spec)
    resident = images * 3 * side * side + 4 * (cx.params + 3 * cx.trainable_params)
    if caches_features(spec):
        resident += images * 4 * feature_dim(spec.model)
        step = spec.recipe.batch_size * 4 * (feature_dim(spec.model) + spec.model.num_classes)
    else:
        step = spec.recipe.batch_size * activation_bytes_per_image(spec.model)
    no_grad = EVAL_BATCH * inference_bytes_per_image(spec.model)
    return resident + max(step, no_grad)


def step_flops(spec: TrialSpec) -> float:
    """FLOPs of one training step, as the compute share counts them (see the module's docstring)."""
    from raybench.complexity import complexity
    b = spec.recipe.batch_size
    if caches_features(spec):
        return 3 * 2 * feature_dim(spec.model) * spec.model.num_classes * b
    passes = 1 if spec.model.frozen_backbone else 3
    return passes * complexity(spec.model).flops * b


def gpu_fraction(spec: TrialSpec, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
                 memory_bytes: int | None = None) -> float:
    memory_bytes = trial_memory_bytes(spec) if memory_bytes is None else memory_bytes
    compute = step_flops(spec) / FULL_GPU_STEP_FLOPS
    memory = (memory_bytes + CUDA_OVERHEAD_BYTES) / (gpu_memory_gb * 1e9)
    share = max(compute, memory)
    if share >= 1:
        return 1.0
    return max(MIN_FRACTION, 2.0 ** math.ceil(math.log2(share)))


def next_share(share: float) -> float:
    """The share a trial that ran out of GPU memory is re-queued with: twice its own, up to a whole GPU."""
    return min(1.0, 2 * share)


def allocator_fraction(name: str, need: int, share: float, gpu_bytes: int) -> float:
    """The cap for a trial's CUDA caching allocator: its share of this GPU less the CUDA context's room.
    Raises when that is below the trial's estimate `need` (trial_memory_bytes, computed by the driver): the
    share was sized for a larger GPU (a driver on a machine without CUDA assumes --gpu-memory-gb, default
    80 GB), and the trial would run out mid-epoch."""
    cap = share * gpu_bytes - CUDA_OVERHEAD_BYTES
    if cap < need:
        raise RuntimeError(
            f"{name}: its GPU share {share:g} of this {gpu_bytes / 1e9:.0f} GB GPU leaves {cap / 1e9:.2f} GB "
            f"after the CUDA context, below the {need / 1e9:.2f} GB it is estimated to need; run the grid with "
            f"--gpu-memory-gb {gpu_bytes / 1e9:.0f} so the shares are sized for this GPU")
    return cap / gpu_bytes


def trial_resources(spec: TrialSpec, gpus: float, cpus_per_trial: float, override: dict,
                    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB, memory_bytes: int | None = None) -> dict:
    """{"cpu": c, "gpu": g} for one trial: the rule above, the experiment's overrides, no GPU when gpus == 0."""
    res = {"cpu": cpus_per_trial, "gpu": 0.0}
    if gpus > 0 and "gpu" not in override:
        res["gpu"] = gpu_fraction(spec, gpu_memory_gb, memory_bytes)
    res.update(override)
    if gpus <= 0:
        res["gpu"] = 0.0
    return res


def gpu_memory_gb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return DEFAULT_GPU_MEMORY_GB


def unfit(resources: dict[str, dict], nodes: list[dict]) -> str | None:
    """Why a trial cannot be placed on any of these nodes ({"CPU": c, "GPU": g} each: the nodes a cluster has,
    or the node types an autoscaler may add), or None. Tune would keep such a trial PENDING forever with
    nothing but log warnings, so the grid says so before fit(). A trial's CPUs and GPU share must fit on one
    node, as Ray places a trial's bundle on one node."""
    for name, r in resources.items():
        if not any(r["cpu"] <= n.get("CPU", 0) + 1e-9 and r["gpu"] <= n.get("GPU", 0) + 1e-9 for n in nodes):
            offer = "; ".join(f"{n.get('CPU', 0):g} CPU and {n.get('GPU', 0):g} GPU" for n in nodes) or "no node"
            return f"trial {name} asks for {r['cpu']:g} CPU and {r['gpu']:g} GPU, but the nodes offer {offer}"
    return None


def max_concurrent(resources: dict[str, dict], gpu_cap: float | None) -> int:
    """On a cluster, --gpus N caps the GPUs in use: at most as many trials as the largest fractions fit in N."""
    if gpu_cap is None:
        return 0  # no cap
    fractions = sorted((r["gpu"] for r in resources.values()), reverse=True)
    if not fractions or fractions[0] == 0:
        return 0
    n, used = 0, 0.0
    for f in fractions:
        if used + f > gpu_cap + 1e-9:
            break
        used, n = used + f, n + 1
    return max(1, n)
