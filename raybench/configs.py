"""The study's configurations: small frozen dataclasses, validated at construction, named the way the study
names them, and serialisable into Ray's param space (plain dicts) and back.

A model config's `name` is the join key everywhere: Ray trial name, Parquet `trial` column, plot label.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

# Built-in Swin architectures (the Hugging Face checkpoints' configs), so Swin-Tiny from scratch and the
# complexity figures need no download. Keys are the checkpoints users name.
SWIN_ARCHS: dict[str, dict[str, Any]] = {
    "microsoft/swin-tiny-patch4-window7-224": dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, patch_size=4,
        image_size=224, mlp_ratio=4.0),
    "microsoft/swin-small-patch4-window7-224": dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, patch_size=4,
        image_size=224, mlp_ratio=4.0),
}
# A micro Swin for 32x32 inputs with *random* weights: the smoke experiment's offline stand-in for a
# pretrained checkpoint. raybench writes it with save_pretrained on first use and loads it back through
# from_pretrained, the same path the real checkpoints take; its "fine-tuned" results mean nothing.
SWIN_MICRO = "raybench/swin-micro-random"
SWIN_ARCHS[SWIN_MICRO] = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=2,
                              image_size=32, mlp_ratio=4.0)
SWIN_SHORT = {"tiny": "microsoft/swin-tiny-patch4-window7-224",
              "small": "microsoft/swin-small-patch4-window7-224", "micro": SWIN_MICRO}


class ConfigError(ValueError):
    """A config value that raybench rejects; the message names the field, the value and what is accepted."""


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n}={v!r}: must be a finite positive number")


def _whole(obj, *names):
    """Counts and sizes must be ints: 4.0 would pass here and break inside torch, and name 'vit-p4.0-...'."""
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{type(obj).__name__}.{n}={v!r}: must be a whole number (no decimal point)")


def _flag(obj, *names):
    """YAML's "false" in quotes is a non-empty string, which Python takes as True."""
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, bool):
            raise ConfigError(f"{type(obj).__name__}.{n}={v!r}: must be true or false (unquoted in YAML)")


def _choice(obj, name, choices):
    v = getattr(obj, name)
    if v not in choices:
        raise ConfigError(f"{type(obj).__name__}.{name}={v!r}: must be one of {sorted(choices)}")


# The model config classes by family (the Parquet `family` column), and by the prefix their names begin with
# (`torchvision:<arch>`), each added by @model_config where the class is defined; a duplicate raises.
FAMILIES: dict[str, type] = {}
PREFIXES: dict[str, type] = {}


def model_config(cls):
    """Register a model config class. It has `family`, `name`, `num_classes` and `frozen_backbone`, and either a
    `prefix` and `name_fields(rest)` (`<prefix>:<rest>` names) or `from_name(name, num_classes, image_size)`
    (its own name grammar, None for a name not of its family), with `GRAMMAR` saying that grammar in errors."""
    if cls.family in FAMILIES:
        raise ValueError(f"model family {cls.family!r} is registered twice")
    FAMILIES[cls.family] = cls
    if getattr(cls, "prefix", None):
        PREFIXES[cls.prefix] = cls
    return cls


def usual_image_size(pretrained: bool) -> int:
    """The input side a model trains at unless told: the 224 px ImageNet weights saw, else CIFAR's own 32 px."""
    return 224 if pretrained else 32


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x).replace(".", "p")


_VIT_NAME = re.compile(r"^vit-p(\d+)-e(\d+)-l(\d+)-h(\d+)-m(\d+(?:p\d+)?)(?:-d(\d+(?:p\d+)?))?(?:-(\d+))?$")


@model_config
@dataclass(frozen=True)
class ViTConfig:
    family: ClassVar[str] = "vit"
    GRAMMAR: ClassVar[str] = "vit-p<P>-e<D>-l<L>-h<H>-m<R>[-d<dropout>][-<size>]"
    patch: int = 8  # patch side in pixels; must divide image_size
    dim: int = 256  # embedding width
    depth: int = 4  # encoder blocks
    heads: int = 2  # attention heads; must divide dim
    mlp_ratio: float = 2.0  # MLP hidden = mlp_ratio x dim
    dropout: float = 0.0
    image_size: int = 32
    num_classes: int = 100

    def __post_init__(self):
        _positive(self, "patch", "dim", "depth", "heads", "mlp_ratio", "image_size", "num_classes")
        _whole(self, "patch", "dim", "depth", "heads", "image_size", "num_classes")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ViTConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if self.image_size % self.patch:
            raise ConfigError(f"ViTConfig.patch={self.patch}: must divide image_size={self.image_size}")
        if self.dim % self.heads:
            raise ConfigError(f"ViTConfig.heads={self.heads}: must divide dim={self.dim}")
        if (self.mlp_ratio * self.dim) != int(self.mlp_ratio * self.dim):
            raise ConfigError(f"ViTConfig.mlp_ratio={self.mlp_ratio}: mlp_ratio x dim must be an integer")

    @property
    def name(self) -> str:
        # dropout and input size join the name only when set away from the study's (0, 32 px), so a sweep over
        # them gives each trial its own name while the study's names stay as the study writes them
        return (f"vit-p{self.patch}-e{self.dim}-l{self.depth}-h{self.heads}-m{_fmt(self.mlp_ratio)}"
                + (f"-d{_fmt(self.dropout)}" if self.dropout else "")
                + (f"-{self.image_size}" if self.image_size != 32 else ""))

    @property
    def frozen_backbone(self) -> bool:
        return False

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.dim)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @classmethod
    def from_name(cls, name: str, num_classes: int, image_size: int) -> ViTConfig | None:
        m = _VIT_NAME.match(name)
        if not m:
            return None
        p, e, l, h, r, d, size = m.groups()
        return cls(int(p), int(e), int(l), int(h), float(r.replace("p", ".")),
                   dropout=float(d.replace("p", ".")) if d else 0.0,
                   image_size=int(size) if size else image_size, num_classes=num_classes)


@model_config
@dataclass(frozen=True)
class ResNetConfig:
    family: ClassVar[str] = "resnet"
    GRAMMAR: ClassVar[str] = "resnet18-{cifar,imagenet}[-pt][-<size>]"
    stem: str = "cifar"  # "cifar": 3x3 conv stride 1, no max-pool; "imagenet": torchvision's 7x7/2 + max-pool
    pretrained: bool = False  # torchvision ImageNet weights (needs the imagenet stem)
    image_size: int = 32  # the size the model sees; pretrained weights expect 224
    num_classes: int = 100

    def __post_init__(self):
        _choice(self, "stem", {"cifar", "imagenet"})
        _positive(self, "image_size", "num_classes")
        _whole(self, "image_size", "num_classes")
        _flag(self, "pretrained")
        if self.pretrained and self.stem != "imagenet":
            raise ConfigError("ResNetConfig.pretrained=True: ImageNet weights need stem='imagenet' "
                              f"(got stem={self.stem!r})")

    @property
    def name(self) -> str:
        # the input size joins the name when it is not the usual one (32 px from scratch, 224 px pretrained):
        # resnet18-imagenet-224 is the scratch control for resnet18-imagenet-pt
        return (f"resnet18-{self.stem}" + ("-pt" if self.pretrained else "")
                + (f"-{self.image_size}" if self.image_size != usual_image_size(self.pretrained) else ""))

    @property
    def frozen_backbone(self) -> bool:
        return False  # a pretrained ResNet-18 fine-tunes every layer

    @classmethod
    def from_name(cls, name: str, num_classes: int, image_size: int) -> ResNetConfig | None:
        m = re.match(r"^resnet18-(cifar|imagenet)(-pt)?(?:-(\d+))?$", name)
        if not m:
            return None
        size = int(m.group(3)) if m.group(3) else (usual_image_size(True) if m.group(2) else image_size)
        return cls(m.group(1), bool(m.group(2)), num_classes=num_classes, image_size=size)


@model_config
@dataclass(frozen=True)
class SwinConfig:
    family: ClassVar[str] = "swin"
    GRAMMAR: ClassVar[str] = "swin-{tiny,small,micro}-{ft,scratch}"
    checkpoint: str = SWIN_SHORT["tiny"]  # HF hub name or a local folder written by save_pretrained
    finetune: bool = True  # True: pretrained weights, frozen backbone, only the new head trains
    num_classes: int = 100

    def __post_init__(self):
        _positive(self, "num_classes")
        _whole(self, "num_classes")
        _flag(self, "finetune")
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ConfigError(f"SwinConfig.checkpoint={self.checkpoint!r}: must be a hub name "
                              f"({', '.join(SWIN_ARCHS)}) or a local folder")

    @property
    def short(self) -> str:
        for k, v in SWIN_SHORT.items():
            if v == self.checkpoint:
                return k
        return re.sub(r"[^a-z0-9]+", "-", self.checkpoint.rstrip("/").split("/")[-1].lower()).strip("-")

    @property
    def name(self) -> str:
        return f"swin-{self.short}-" + ("ft" if self.finetune else "scratch")

    @property
    def frozen_backbone(self) -> bool:
        return self.finetune

    @classmethod
    def from_name(cls, name: str, num_classes: int, image_size: int) -> SwinConfig | None:
        m = re.match(r"^swin-(tiny|small|micro)-(ft|scratch)$", name)
        return cls(SWIN_SHORT[m.group(1)], m.group(2) == "ft", num_classes=num_classes) if m else None


# --- models the study's dependencies provide, named by their source: torchvision:, hf:, py: -------------------
# Their figures are counted on the built model (raybench.complexity), not derived in closed form.

def _slug(text: str) -> str:
    """Lower-case letters, digits, '_' and '.', runs of anything else as one '-': safe in file names."""
    return re.sub(r"[^a-z0-9_.]+", "-", str(text).lower()).strip("-")


@model_config
@dataclass(frozen=True)
class TorchvisionConfig:
    """Any classification model `torchvision.models.get_model` builds, e.g. convnext_tiny, mobilenet_v3_small."""
    family: ClassVar[str] = "torchvision"
    prefix: ClassVar[str] = "torchvision"
    GRAMMAR: ClassVar[str] = "torchvision:<arch>"
    arch: str = "resnet18"  # a name in torchvision.models.list_models(module=torchvision.models)
    pretrained: bool = False  # torchvision's default weights for the arch, head replaced for num_classes
    image_size: int | None = None  # None: 224 when pretrained (what the weights saw), else 32 (CIFAR's own)
    num_classes: int = 100

    def __post_init__(self):
        _flag(self, "pretrained")
        if self.image_size is None:
            object.__setattr__(self, "image_size", usual_image_size(self.pretrained))
        _positive(self, "image_size", "num_classes")
        _whole(self, "image_size", "num_classes")
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(f"TorchvisionConfig.arch={self.arch!r}: must be a torchvision model name")

    @property
    def name(self) -> str:
        return (f"tv-{self.arch}" + ("-pt" if self.pretrained else "")
                + (f"-{self.image_size}" if self.image_size != usual_image_size(self.pretrained) else ""))

    @staticmethod
    def name_fields(rest: str) -> dict:
        return {"arch": rest}

    @property
    def frozen_backbone(self) -> bool:
        return False


@model_config
@dataclass(frozen=True)
class HFConfig:
    """Any Hugging Face `AutoModelForImageClassification` checkpoint, with a new head for num_classes.

    Default: the pretrained weights, all of them trained. `finetune`: pretrained, backbone frozen, only the head
    trains (its features cached, as for Swin). `scratch`: the checkpoint's architecture with random weights."""
    family: ClassVar[str] = "hf"
    prefix: ClassVar[str] = "hf"
    GRAMMAR: ClassVar[str] = "hf:<checkpoint or folder>"
    checkpoint: str = "facebook/deit-tiny-patch16-224"  # hub id or a local folder written by save_pretrained
    finetune: bool = False
    scratch: bool = False
    image_size: int | None = None  # the checkpoint's; filled in when an experiment loads (models.check_model)
    num_classes: int = 100

    def __post_init__(self):
        _flag(self, "finetune", "scratch")
        _positive(self, "num_classes")
        _whole(self, "num_classes")
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ConfigError(f"HFConfig.checkpoint={self.checkpoint!r}: must be a Hugging Face model id "
                              "(facebook/deit-tiny-patch16-224) or a folder written by save_pretrained")
        if self.finetune and self.scratch:
            raise ConfigError("HFConfig: finetune=True and scratch=True: a frozen backbone needs pretrained "
                              "weights; choose one")
        if self.image_size is not None:
            _positive(self, "image_size")
            _whole(self, "image_size")

    @property
    def short(self) -> str:
        # facebook/deit-tiny-patch16-224 -> deit-tiny; deit-base-patch16-384 -> deit-base-384
        s = _slug(self.checkpoint.rstrip("/").split("/")[-1])
        return re.sub(r"-patch\d+|-window\d+|-224(?=-|$)", "", s) or s

    @property
    def name(self) -> str:
        return f"hf-{self.short}-" + ("ft" if self.finetune else "scratch" if self.scratch else "pt")

    @property
    def pretrained(self) -> bool:
        return not self.scratch

    @staticmethod
    def name_fields(rest: str) -> dict:
        return {"checkpoint": rest}

    @property
    def frozen_backbone(self) -> bool:
        return self.finetune


def _freeze_kwargs(where: str, kwargs) -> tuple:
    """kwargs as sorted (key, value) pairs, lists as tuples: a config must hash (it keys caches)."""
    items = kwargs.items() if isinstance(kwargs, dict) else kwargs
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={kwargs!r}: must be a mapping of keyword arguments, e.g. {{width: 64}}") from None
    out = []
    for k, v in pairs:
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"{where}: key {k!r} is not a Python keyword argument name")
        if isinstance(v, (list, tuple)):
            v = tuple(v)
        scalars = v if isinstance(v, tuple) else (v,)
        if not all(x is None or isinstance(x, (bool, int, float, str)) for x in scalars):
            raise ConfigError(f"{where}.{k}={v!r}: values must be numbers, strings, booleans, null or lists of "
                              "them (the config travels through Ray's param space)")
        out.append((k, v))
    return tuple(sorted(out, key=lambda kv: kv[0]))


@model_config
@dataclass(frozen=True)
class PyConfig:
    """`function(**kwargs)` from an importable `module`, returning an nn.Module mapping (B, 3, H, W) to logits.

    The function is given `num_classes=` too when its signature takes it. `finetune` freezes everything but what
    `forward_head` uses; the module must then define `forward_features(x) -> (B, C)` and `forward_head(f)`."""
    family: ClassVar[str] = "py"
    prefix: ClassVar[str] = "py"
    GRAMMAR: ClassVar[str] = "py:<module>:<function>"
    module: str = ""
    function: str = ""
    kwargs: tuple = ()  # sorted (key, value) pairs; experiment files write a mapping
    path: str | None = None  # folder put on sys.path before importing (the experiment file's): Ray workers need it
    image_size: int = 32
    finetune: bool = False
    num_classes: int = 100

    def __post_init__(self):
        for f in ("module", "function"):
            v = getattr(self, f)
            if not isinstance(v, str) or not all(p.isidentifier() for p in v.split(".")):
                raise ConfigError(f"PyConfig.{f}={v!r}: must be a dotted Python name (py:<module>:<function>)")
        object.__setattr__(self, "kwargs", _freeze_kwargs("PyConfig.kwargs", self.kwargs))
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError(f"PyConfig.path={self.path!r}: must be a folder")
        _flag(self, "finetune")
        _positive(self, "image_size", "num_classes")
        _whole(self, "image_size", "num_classes")

    @property
    def kwargs_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}

    @property
    def name(self) -> str:
        def value(v):
            if isinstance(v, tuple):
                return "x".join(value(x) for x in v)
            return _fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _slug(v)
        return (f"py-{self.function}" + "".join(f"-{_slug(k)}{value(v)}" for k, v in self.kwargs)
                + (f"-{self.image_size}" if self.image_size != 32 else "") + ("-ft" if self.finetune else ""))

    @property
    def frozen_backbone(self) -> bool:
        return self.finetune

    @staticmethod
    def name_fields(rest: str) -> dict:
        module, sep, function = rest.rpartition(":")
        if not sep or not module or not function:
            raise ConfigError(f"model name 'py:{rest}': expected py:<module>:<function>, e.g. py:mymodels:small_cnn")
        return {"module": module, "function": function}


# Every model config has `name`, `num_classes` and `frozen_backbone`: True when only a new head trains on a
# backbone that never changes. The trainer's feature cache, the GPU share's compute term and the trainable
# parameter count all follow that one property, so a new family declares it once.
ModelConfig = Union[ViTConfig, ResNetConfig, SwinConfig, TorchvisionConfig, HFConfig, PyConfig]


@dataclass(frozen=True)
class Recipe:
    """How a model is trained. `seed` is the study as first specified, `improved` a modern recipe."""
    name: str = "seed"
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 30
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (linear warmup, then cosine decay to 0)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: tuple[str, ...] = ()  # subset of ("crop", "flip")

    AUGMENTS: ClassVar[frozenset] = frozenset({"crop", "flip"})

    def __post_init__(self):
        _choice(self, "optimizer", {"adam", "adamw"})
        _choice(self, "schedule", {"constant", "cosine"})
        if isinstance(self.augment, str):
            raise ConfigError(f"Recipe.augment={self.augment!r}: must be a list, such as [crop, flip]")
        object.__setattr__(self, "augment", tuple(self.augment))
        if isinstance(self.lr, str):  # YAML 1.1 reads 1e-3 (no decimal point) as a string
            raise ConfigError(f"Recipe.lr={self.lr!r}: must be a positive number; in YAML write 1.0e-3, not 1e-3")
        _positive(self, "lr", "batch_size", "epochs")
        _whole(self, "batch_size", "epochs")
        if not math.isfinite(self.lr):
            raise ConfigError(f"Recipe.lr={self.lr!r}: must be a finite positive number")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"Recipe: weight_decay={self.weight_decay}, warmup_epochs={self.warmup_epochs} "
                              f"must be >= 0 and label_smoothing={self.label_smoothing} in [0, 1)")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"Recipe.warmup_epochs={self.warmup_epochs}: must be <= epochs={self.epochs} (the "
                              "learning rate would never reach its peak)")
        bad = set(self.augment) - self.AUGMENTS
        if bad:
            raise ConfigError(f"Recipe.augment={list(self.augment)!r}: unknown {sorted(bad)}; "
                              f"accepted: {sorted(self.AUGMENTS)}")


def default_recipe(name: str, model: ModelConfig) -> Recipe:
    """The study's recipes per family. Swin runs use batch 32, Adam 2e-5, 3 epochs as the study asks."""
    swin = isinstance(model, SwinConfig)
    if name == "seed":
        return Recipe("seed", "adam", 2e-5 if swin else 1e-3, 32 if swin else 64, 3 if swin else 30)
    if name == "improved":
        # Random crops shift a ViT's patches across patch boundaries and its learned position embeddings: at
        # the study's budgets they cost it more than they give (docs/benchmarks.md, "The improved recipe on
        # real images"), while a CNN's convolutions shift with the image.
        augment = ("flip",) if isinstance(model, ViTConfig) else ("crop", "flip")
        return Recipe("improved", "adamw", 1e-4 if swin else 1e-3, 32 if swin else 64, 3 if swin else 30,
                      weight_decay=0.05, schedule="cosine", warmup_epochs=0.5 if swin else 2.0,
                      label_smoothing=0.1, augment=augment)
    raise ConfigError(f"recipe={name!r}: must be one of ['improved', 'seed']")


@dataclass(frozen=True)
class DataSpec:
    name: str = "synthetic"  # cifar100 | synthetic | imagefolder
    data_dir: str | None = None  # cifar100: existing copy / download target; imagefolder: root with train/ test/
    train_size: int = 50_000  # synthetic only
    test_size: int = 10_000  # synthetic only
    download: bool = True  # cifar100: try to download when data_dir has no copy

    def __post_init__(self):
        _choice(self, "name", {"cifar100", "synthetic", "imagefolder"})
        _positive(self, "train_size", "test_size")
        _whole(self, "train_size", "test_size")
        _flag(self, "download")
        if self.name == "imagefolder" and not self.data_dir:
            raise ConfigError("DataSpec.data_dir=None: dataset 'imagefolder' needs --data-dir "
                              "(a folder with train/<class>/* and test/<class>/*)")


# Training precision: "bf16" autocast, "fp32", or "auto": bf16 where the device computes it natively (a CUDA GPU
# with bf16, a CPU with AVX-512-BF16 or AMX), fp32 elsewhere. raybench.train.resolve_precision decides per device.
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs; travels through Ray's param_space as a plain dict (`to_dict`)."""
    model: ModelConfig
    recipe: Recipe
    data: DataSpec = field(default_factory=DataSpec)
    seed: int = 0
    multi_seed: bool = False  # the experiment repeats trials over seeds: put the seed in the name
    compile: bool = False  # torch.compile the model (compile time is reported apart from epoch time)
    precision: str = "auto"  # one of PRECISIONS; the record says which one the device resolved it to

    def __post_init__(self):
        _whole(self, "seed")
        _flag(self, "multi_seed", "compile")
        _choice(self, "precision", set(PRECISIONS))

    @property
    def name(self) -> str:
        # a precision set away from auto joins the name, so a sweep over precisions names every trial
        return (f"{self.model.name}-{self.recipe.name}" + (f"-{self.precision}" if self.precision != "auto" else "")
                + (f"-s{self.seed}" if self.multi_seed else ""))

    def to_dict(self) -> dict:
        return {"family": self.model.family, "model": dataclasses.asdict(self.model),
                "recipe": {**dataclasses.asdict(self.recipe), "augment": list(self.recipe.augment)},
                "data": dataclasses.asdict(self.data), "seed": self.seed, "multi_seed": self.multi_seed,
                "compile": self.compile, "precision": self.precision}

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        return cls(model=model_from_dict(d["family"], d["model"]), recipe=Recipe(**d["recipe"]),
                   data=DataSpec(**d["data"]), seed=d["seed"], multi_seed=d.get("multi_seed", False),
                   compile=d.get("compile", False), precision=d.get("precision", "auto"))


def model_from_dict(family: str, fields: dict) -> ModelConfig:
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r}: must be one of {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
        raise ConfigError(f"{family} model: unknown field(s) {sorted(unknown)}; accepted: {sorted(known)}")
    return cls(**fields)


def _prefixed(name: str) -> tuple[type, dict] | None:
    """`torchvision:<arch>`, `hf:<checkpoint>`, `py:<module>:<function>` -> (config class, its fields), else None.
    Paths in them are taken from the experiment file's folder when it loads (raybench.experiments.locate)."""
    prefix, sep, rest = name.partition(":")
    if not sep or prefix not in PREFIXES:
        return None
    return PREFIXES[prefix], PREFIXES[prefix].name_fields(rest)


def model_from_name(name: str, fields: dict | None = None, num_classes: int = 100) -> ModelConfig:
    """A model name with fields that refine it (`{pretrained: true}` beside `torchvision:convnext_tiny`)."""
    fields = dict(fields or {})
    prefixed = _prefixed(name) if isinstance(name, str) else None
    if prefixed:
        cls, base = prefixed
        return model_from_dict(cls.family, {"num_classes": num_classes, **base, **fields})
    base = parse_model_name(name, num_classes=num_classes)
    return model_from_dict(base.family, {**dataclasses.asdict(base), **fields})


def parse_model_name(name: str, num_classes: int = 100, image_size: int = 32) -> ModelConfig:
    """`vit-p4-e256-l8-h2-m2`, `resnet18-cifar`, `resnet18-imagenet-pt`, `swin-tiny-ft`, `swin-small-scratch`;
    and models from the study's dependencies: `torchvision:<arch>`, `hf:<checkpoint or folder>`,
    `py:<module>:<function>` (their other fields at their defaults): each family's own grammar."""
    if not isinstance(name, str):
        raise ConfigError(f"model name {name!r}: must be a string")
    prefixed = _prefixed(name)
    if prefixed:
        cls, base = prefixed
        return cls(**base, num_classes=num_classes)
    for cls in FAMILIES.values():
        cfg = None if getattr(cls, "prefix", None) else cls.from_name(name, num_classes, image_size)
        if cfg is not None:
            return cfg
    grammars = [cls.GRAMMAR for cls in FAMILIES.values()]
    raise ConfigError(f"model name {name!r}: expected {', '.join(grammars[:-1])} or {grammars[-1]}")


def vit_grid(image_size: int = 32, num_classes: int = 100) -> list[ViTConfig]:
    """The study's 32 ViT configurations: patch x dim x depth x heads x MLP ratio."""
    return [ViTConfig(p, d, l, h, float(r), image_size=image_size, num_classes=num_classes)
            for p in (4, 8) for d in (256, 512) for l in (4, 8) for h in (2, 4) for r in (2, 4)]


def study_models(num_classes: int = 100) -> list[ModelConfig]:
    """Every architecture of the study (no tiny test entries): the 32 ViTs, ResNet-18 both stems, Swin T/S."""
    return [*vit_grid(num_classes=num_classes), ResNetConfig("cifar", num_classes=num_classes),
            ResNetConfig("imagenet", num_classes=num_classes),
            SwinConfig(SWIN_SHORT["tiny"], False, num_classes), SwinConfig(SWIN_SHORT["small"], False, num_classes)]
