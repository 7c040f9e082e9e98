"""Experiment files into trial specs: the built-in studies, overrides, and fields beside a model name."""
import json

import pytest

from raybench.configs import SwinConfig
from raybench.experiments import ExperimentError, load_experiment


def test_builtin_studies_have_the_trials_the_study_names():
    seed = load_experiment("seed")
    assert [t.name for t in seed.trials] == [
        "vit-p8-e256-l4-h2-m2-seed", "vit-p8-e512-l4-h4-m4-seed", "vit-p4-e256-l8-h2-m2-seed",
        "vit-p4-e512-l8-h4-m4-seed", "resnet18-cifar-seed", "resnet18-imagenet-pt-seed", "swin-tiny-ft-seed",
        "swin-small-ft-seed", "swin-tiny-scratch-seed"]
    swin = [t for t in seed.trials if isinstance(t.model, SwinConfig)]
    assert {(t.recipe.batch_size, t.recipe.optimizer, t.recipe.lr, t.recipe.epochs) for t in swin} == {
        (32, "adam", 2e-5, 3)}
    others = [t for t in seed.trials if not isinstance(t.model, SwinConfig)]
    assert {(t.recipe.batch_size, t.recipe.optimizer, t.recipe.lr, t.recipe.epochs) for t in others} == {
        (64, "adam", 1e-3, 30)}
    full = load_experiment("full")
    assert sum(t.model.family == "vit" for t in full.trials) == 32 * 2 and {t.recipe.name for t in full.trials} == {
        "seed", "improved"}
    # pretrained ResNet-18 and its control from scratch differ in the weights alone
    pt, control = (next(t.model for t in full.trials if t.model.name == n)
                   for n in ("resnet18-imagenet-pt", "resnet18-imagenet-224"))
    assert (pt.stem, pt.image_size, pt.pretrained) == (control.stem, control.image_size, True) and not control.pretrained


def test_overrides_and_seeds():
    exp = load_experiment("smoke", epochs=5, seeds=[0, 1], dataset="synthetic", train_size=100)
    assert {t.recipe.epochs for t in exp.trials} == {5}
    assert {t.data.train_size for t in exp.trials} == {100}
    assert len(exp.trials) == 2 * len(load_experiment("smoke").trials)
    assert all(t.name.endswith(("-s0", "-s1")) for t in exp.trials)


def test_fields_beside_a_name_refine_the_model(tmp_path, tiny_swin_dir):
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"models": [{"name": "swin-tiny-ft", "checkpoint": tiny_swin_dir},
                                           {"name": "vit-p8-e32-l1-h2-m2", "dropout": 0.1}]}))
    swin, vit = (t.model for t in load_experiment(str(path)).trials)
    assert swin.checkpoint == tiny_swin_dir and swin.finetune
    assert vit.dropout == 0.1 and vit.name == "vit-p8-e32-l1-h2-m2-d0p1"  # the name says what differs


def test_a_sweep_over_fields_beyond_the_study_knobs_names_every_trial(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"models": [{"grid": {"family": "vit", "patch": 8, "dim": 64, "depth": 1,
                                                     "heads": 2, "dropout": [0.0, 0.1], "image_size": [32, 64]}}]}))
    assert sorted(t.name for t in load_experiment(str(path)).trials) == [
        "vit-p8-e64-l1-h2-m2-64-seed", "vit-p8-e64-l1-h2-m2-d0p1-64-seed", "vit-p8-e64-l1-h2-m2-d0p1-seed",
        "vit-p8-e64-l1-h2-m2-seed"]


@pytest.mark.parametrize("content, message", [
    ({"models": [{"family": "vit", "patch": 4.0}]}, r"patch=4\.0: must be a whole number"),
    ({"models": [{"name": "resnet18-imagenet", "pretrained": "false"}]}, r"pretrained='false'.*true or false"),
    ({"models": ["resnet18-cifar"], "dataset": {"name": "synthetic", "train_size": 100.5}}, r"train_size=100\.5"),
    ({"models": ["resnet18-cifar"], "recipe": {"lr": "1e-3"}}, r"lr='1e-3'.*write 1\.0e-3"),
    ({"models": ["resnet18-cifar"], "recipe": {"augment": "crop"}}, r"augment='crop': must be a list"),
    ({"models": ["resnet18-cifar"], "recipe": {"warmup_epochs": 40}}, r"warmup_epochs=40: must be <= epochs=30"),
    ({"models": ["resnet18-cifar"], "resources": {"cpu": 0}}, r"resources\.cpu=0"),
    ({"models": ["resnet18-cifar"], "seeds": [True]}, r"seed=True: must be a whole number"),
    ({"models": [{"grid": {"family": "vit", "patch": []}}]}, r"models\[0\] \(grid\): grid\.patch=\[\]"),
    ({"models": [{"grid": {"family": "vit", "patch": [4, 8]}, "dim": 64}]}, r"\['dim'\] beside grid"),
    ({"models": [{"name": "resnet18-cifar", "family": "vit", "patch": 4}]}, r"give a name .* not both"),
])
def test_values_that_would_fail_inside_a_trial_are_refused_when_loading(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(content))
    with pytest.raises(ExperimentError, match=message):
        load_experiment(str(path))


def test_precision_per_file_per_entry_and_as_a_sweep(tmp_path):
    path = tmp_path / "precision.yaml"
    path.write_text(json.dumps({"precision": "fp32", "models": [
        "vit-p8-e32-l1-h2-m2", {"name": "resnet18-cifar", "precision": ["auto", "bf16"]}]}))
    trials = {t.name: t.precision for t in load_experiment(str(path)).trials}
    assert trials == {"vit-p8-e32-l1-h2-m2-seed-fp32": "fp32", "resnet18-cifar-seed": "auto",
                      "resnet18-cifar-seed-bf16": "bf16"}
    # the CLI's override wins over the file, as --epochs does
    assert {t.precision for t in load_experiment(str(path), precision="bf16").trials} == {"bf16"}
    path.write_text(json.dumps({"models": [{"name": "resnet18-cifar", "precision": "fp16"}]}))
    with pytest.raises(ExperimentError, match=r"models\[0\] \(resnet18-cifar\): precision='fp16' must be one of"):
        load_experiment(str(path))
