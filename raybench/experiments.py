"""Experiment files (`experiments/<name>.yaml`) into a list of TrialSpecs, validated before Ray starts.

An experiment file is plain YAML:

    name: seed
    dataset: {name: cifar100}        # or a bare name; synthetic takes train_size / test_size
    num_classes: 100
    recipes: [seed]                  # every model runs under each recipe
    seeds: [0]
    epochs: 30                       # optional: overrides the recipes' epochs (Swin keeps its own unless set there)
    recipe: {batch_size: 64}         # optional: overrides applied to every recipe
    resources: {cpu: 1}              # optional: per-trial resources for every trial (gpu: a fraction)
    precision: auto                  # optional: auto (bf16 where the device has it natively), bf16 or fp32
    models:
      - vit-p8-e256-l4-h2-m2                                  # a model name
      - {name: resnet18-cifar, resources: {gpu: 0.5}}         # a name with per-model settings
      - {family: vit, patch: 4, dim: 64, depth: 2, heads: 2, mlp_ratio: 2}
      - {grid: {family: vit, patch: [4, 8], dim: [256, 512]}} # every combination
      - {name: swin-tiny-ft, recipe: {epochs: 3}}
      - {name: "torchvision:convnext_tiny", pretrained: true}   # any torchvision classifier (image_size: ...)
      - {name: "hf:facebook/deit-tiny-patch16-224", finetune: true}  # any HF image classifier (or scratch: true)
      - {name: "py:mymodels:small_cnn", kwargs: {width: 64}}    # your own: mymodels.py beside this file
      - {name: resnet18-cifar, precision: [fp32, bf16]}       # one trial each, named -fp32 and -bf16

Errors name the file, the entry and the field.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raybench.configs import (FAMILIES, PRECISIONS, ConfigError, DataSpec, ModelConfig, Recipe, SwinConfig,
                              TrialSpec, default_recipe, model_from_dict, model_from_name, parse_model_name)

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
TOP_KEYS = {"name", "description", "dataset", "num_classes", "recipes", "seeds", "epochs", "recipe", "resources",
            "precision", "models"}
TRIAL_KEYS = {"recipe", "resources", "epochs", "precision"}  # how an entry's models train, beside what they are
ENTRY_KEYS = {"name", "family", "grid"} | TRIAL_KEYS
RESOURCE_KEYS = {"cpu", "gpu"}


class ExperimentError(ValueError):
    """An invalid experiment file; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Experiment:
    name: str
    path: str
    trials: list[TrialSpec]
    resources: dict[str, dict] = field(default_factory=dict)  # trial name -> {"cpu":..,"gpu":..} overrides
    description: str = ""


def builtin_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"experiment file {p} does not exist")
        return p
    builtin = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise FileNotFoundError(f"experiment {name_or_path!r}: not a file and not a built-in experiment "
                                f"(built-in: {', '.join(builtin_experiments())})")
    return builtin


def _check_keys(where: str, d: dict, allowed: set) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {sorted(unknown)}; accepted: {sorted(allowed)}")


def _resources(where: str, r) -> dict:
    if r is None:
        return {}
    if not isinstance(r, dict):
        raise ExperimentError(f"{where}: resources={r!r} must be a mapping like {{cpu: 1, gpu: 0.5}}")
    _check_keys(f"{where} resources", r, RESOURCE_KEYS)
    for k, v in r.items():
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (k == "cpu" and v == 0)
                or (k == "gpu" and v > 1 and v != int(v))):
            raise ExperimentError(f"{where}: resources.{k}={v!r} must be a number >= 0 "
                                  "(cpu: > 0, a trial's torch threads; gpu: a fraction <= 1 or a whole number)")
    return dict(r)


def model_fields() -> set[str]:
    """The fields an entry may give a model: every registered family's."""
    return {f.name for cls in FAMILIES.values() for f in dataclasses.fields(cls)} - {"num_classes"}


def locate(model: ModelConfig, folder: str | None = None) -> ModelConfig:
    """Paths in a model are taken from `folder` (the experiment file's; default the working one): a py: model's
    module folder (default: the folder itself), an hf: checkpoint folder found there. Recorded absolute, since
    Ray workers run in folders of their own."""
    folder = os.path.abspath(os.path.expanduser(folder or os.getcwd()))
    if model.family == "py":
        path = os.path.join(folder, os.path.expanduser(model.path)) if model.path else folder
        return dataclasses.replace(model, path=path)
    if model.family == "hf" and model.checkpoint:
        local = os.path.join(folder, os.path.expanduser(model.checkpoint))
        if os.path.isdir(local):
            return dataclasses.replace(model, checkpoint=os.path.abspath(local))
    return model


def _entry_models(where: str, entry, num_classes: int, folder: str) -> list[ModelConfig]:
    if isinstance(entry, str):
        return [locate(parse_model_name(entry, num_classes=num_classes), folder)]
    if not isinstance(entry, dict):
        raise ExperimentError(f"{where}: expected a model name or a mapping, got {entry!r}")
    if "grid" in entry:
        if not isinstance(entry["grid"], dict):
            raise ExperimentError(f"{where}: grid={entry['grid']!r} must be a mapping of field -> list of values")
        beside = sorted(set(entry) - {"grid"} - TRIAL_KEYS)  # what describes the model
        if beside:
            raise ExperimentError(f"{where}: {beside} beside grid: put model fields (and family) inside grid, "
                                  "as lists or single values")
        grid = dict(entry["grid"])
        family = grid.pop("family", None)
        if family not in FAMILIES:
            raise ExperimentError(f"{where}: grid.family={family!r} must be one of {sorted(FAMILIES)}")
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        empty = [k for k, v in zip(keys, values) if not v]
        if empty:
            raise ExperimentError(f"{where}: grid.{empty[0]}=[]: give at least one value")
        return [locate(model_from_dict(family, {"num_classes": num_classes, **dict(zip(keys, combo))}), folder)
                for combo in itertools.product(*values)]
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    if "name" in entry and "family" in entry:
        raise ExperimentError(f"{where}: name={entry['name']!r} and family={entry['family']!r}: give a name (with "
                              "fields that refine it) or a family with its fields, not both")
    if "name" in entry:
        # fields beside a name refine it (`{name: swin-tiny-ft, checkpoint: /path}`, `{name: hf:<id>, finetune:
        # true}`); the trial is named after the resulting config
        return [locate(model_from_name(entry["name"], fields, num_classes), folder)]
    family = entry.get("family")
    if family not in FAMILIES:
        raise ExperimentError(f"{where}: family={family!r} must be one of {sorted(FAMILIES)} (or give a name)")
    return [locate(model_from_dict(family, {"num_classes": num_classes, **fields}), folder)]


def _precisions(where: str, p) -> list[str]:
    """A precision or a list of them (a sweep: one trial each)."""
    values = p if isinstance(p, list) else [p]
    bad = [v for v in values if v not in PRECISIONS]
    if bad or not values:
        raise ExperimentError(f"{where}: precision={p!r} must be one of {list(PRECISIONS)} or a list of them")
    return values


def _epochs(where: str, value) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ExperimentError(f"{where}: epochs={value!r}: must be a whole number >= 1")
    return value


def _recipe_owner(path, where: str, name: str, model: ModelConfig, top_recipe: dict, epochs) -> str:
    """Where a recipe's mistake was written: the file's top-level `recipe` when that alone fails, else the entry."""
    try:
        _recipe(where, name, model, top_recipe, epochs)
    except (ConfigError, ExperimentError):
        return f"{path}: top-level recipe"
    return where


def _recipe(where: str, name: str, model: ModelConfig, overrides: dict, epochs: int | None) -> Recipe:
    r = default_recipe(name, model)
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    _check_keys(f"{where} recipe", overrides, known)
    if epochs is not None:
        r = dataclasses.replace(r, epochs=epochs)
    return dataclasses.replace(r, **overrides)


def load_experiment(name_or_path: str, *, epochs: int | None = None, dataset: str | None = None,
                    data_dir: str | None = None, seeds: list[int] | None = None,
                    train_size: int | None = None, test_size: int | None = None,
                    precision: str | None = None) -> Experiment:
    """Read and validate an experiment; the keyword arguments are the CLI's overrides."""
    path = resolve_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ExperimentError(f"{path}: expected a mapping with a 'models' list")
    try:
        return _build(path, doc, epochs, dataset, data_dir, seeds, train_size, test_size, precision)
    except ExperimentError:
        raise
    except ConfigError as e:
        raise ExperimentError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type somewhere in the file
        raise ExperimentError(f"{path}: a value has the wrong type ({type(e).__name__}: {e}); see the format "
                              "at the top of raybench/experiments.py") from None


def _build(path, doc, epochs, dataset, data_dir, seeds, train_size, test_size, precision) -> Experiment:
    from raybench.models import check_model  # torch: only once a file is read
    _check_keys(str(path), doc, TOP_KEYS)
    if not doc.get("models"):
        raise ExperimentError(f"{path}: 'models' must be a non-empty list")
    num_classes = doc.get("num_classes", 100)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ExperimentError(f"{path}: num_classes={num_classes!r} must be a positive integer")
    data = doc.get("dataset", "synthetic")
    if not isinstance(data, (str, dict)):
        raise ExperimentError(f"{path}: dataset={data!r} must be a name (synthetic, cifar100, imagefolder) "
                              "or a mapping like {name: synthetic, train_size: 2000}")
    data = {"name": data} if isinstance(data, str) else dict(data)
    _check_keys(f"{path} dataset", data, {f.name for f in dataclasses.fields(DataSpec)})
    if dataset:
        data["name"] = dataset
    for k, v in (("data_dir", data_dir), ("train_size", train_size), ("test_size", test_size)):
        if v is not None:
            data[k] = v
    if data.get("data_dir"):  # trials run in Ray's own working folders: paths must be absolute
        data["data_dir"] = str(Path(data["data_dir"]).expanduser().resolve())
    data_spec = DataSpec(**data)
    recipes = doc.get("recipes", ["seed"])
    seed_list = seeds if seeds is not None else doc.get("seeds", [0])
    if not isinstance(seed_list, list) or not all(isinstance(s, int) for s in seed_list) or not seed_list:
        raise ExperimentError(f"{path}: seeds={seed_list!r} must be a non-empty list of integers")
    top_epochs = epochs if epochs is not None else _epochs(f"{path}: top level", doc.get("epochs"))
    top_recipe = doc.get("recipe") or {}
    if not isinstance(top_recipe, dict):
        raise ExperimentError(f"{path}: recipe={top_recipe!r} must be a mapping of recipe fields, e.g. {{lr: 0.001}}")
    if not isinstance(recipes, list) or not recipes:
        raise ExperimentError(f"{path}: recipes={recipes!r} must be a list such as [seed, improved]")
    top_res = _resources(f"{path}", doc.get("resources"))
    if precision is not None:  # the CLI's --precision wins over the file's, as --epochs does
        _precisions(f"{path} (override)", precision)
    top_precision = _precisions(f"{path}", doc.get("precision", "auto"))

    trials, resources = [], {}
    for i, entry in enumerate(doc["models"]):
        label = (entry.get("name") or entry.get("family") or ("grid" if "grid" in entry else None)
                 if isinstance(entry, dict) else entry)
        where = f"{path}: models[{i}]" + (f" ({label})" if label else "")
        if isinstance(entry, dict):
            _check_keys(where, entry, ENTRY_KEYS | model_fields())
        try:
            # checked against what they name (torchvision:, hf:, py: models run a test batch now, not in a trial)
            models = [check_model(m) for m in _entry_models(where, entry, num_classes, str(path.parent.resolve()))]
        except ConfigError as e:
            raise ExperimentError(f"{where}: {e}") from None
        entry_recipe = entry.get("recipe", {}) if isinstance(entry, dict) else {}
        if not isinstance(entry_recipe, dict):
            raise ExperimentError(f"{where}: recipe={entry_recipe!r} must be a mapping of recipe fields")
        entry_epochs = _epochs(where, entry.get("epochs")) if isinstance(entry, dict) else None
        entry_res = _resources(where, entry.get("resources") if isinstance(entry, dict) else None)
        entry_precision = (_precisions(where, entry["precision"]) if isinstance(entry, dict) and "precision" in entry
                           else top_precision)
        for model in models:
            for rname in recipes:
                # --epochs wins; then the entry's; Swin keeps the study's 3 epochs over the file-wide value.
                ep = epochs if epochs is not None else (
                    entry_epochs if entry_epochs is not None else (
                        None if isinstance(model, SwinConfig) else top_epochs))
                try:
                    recipe = _recipe(where, rname, model, {**top_recipe, **entry_recipe}, ep)
                except ConfigError as e:
                    raise ExperimentError(f"{_recipe_owner(path, where, rname, model, top_recipe, ep)}: {e}") from None
                for seed, prec in itertools.product(seed_list, [precision] if precision else entry_precision):
                    spec = TrialSpec(model, recipe, data_spec, seed, multi_seed=len(seed_list) > 1, precision=prec)
                    if any(t.name == spec.name for t in trials):
                        raise ExperimentError(
                            f"{where}: trial {spec.name!r} appears twice (a model listed twice, or two Swin "
                            "checkpoint folders with the same last name); every trial needs its own name")
                    trials.append(spec)
                    resources[spec.name] = {**top_res, **entry_res}
    if not trials:
        raise ExperimentError(f"{path}: no trials (models: [] or empty grids)")
    return Experiment(doc.get("name", path.stem), str(path), trials, resources, doc.get("description", ""))
