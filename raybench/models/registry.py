"""The model families, registered once each, by their own module (timm's habit: one registration per model,
tests over the registry). A family says how its config builds a model and what is known about that model
without building it; whatever it leaves out is measured on the built model (random weights). Adding a family is
one module in raybench/models/ that calls `register`, and its line in raybench/models/__init__.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

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


def _no_problem(cfg) -> None:
    return None


def _as_is(cfg):
    return cfg


@dataclass(frozen=True)
class Family:
    config: type  # the config dataclass; its `family` names the family (the Parquet `family` column)
    build: Callable[[Any, bool], Any]  # (config, weights) -> nn.Module; weights=False: random, no download
    closed_form: Callable[[Any], Complexity] | None = None  # None: parameters and FLOPs counted on the model
    feature_dim: Callable[[Any], int] | None = None  # width of forward_features; None: measured on the model
    weights_problem: Callable[[Any], Exception | None] = _no_problem  # why pretrained weights cannot be had
    check: Callable[[Any], Any] = _as_is  # checks that read files, run when an experiment loads; -> completed
    test_batch: bool = False  # a model from elsewhere (torchvision:, hf:, py:): built and tried when it loads
    columns: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # its own trials.parquet columns

    @property
    def name(self) -> str:
        return self.config.family


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def family_of(cfg) -> Family:
    name = getattr(cfg, "family", None)
    if name not in FAMILIES or not isinstance(cfg, FAMILIES[name].config):
        raise TypeError(f"{cfg!r}: not a config of a registered model family ({', '.join(FAMILIES)})")
    return FAMILIES[name]
