"""Experiment files into trial specs: the built-in studies, overrides, and fields beside a model name."""
import json

from raybench.configs import SwinConfig
from raybench.experiments import load_experiment


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
    assert vit.dropout == 0.1 and vit.name == "vit-p8-e32-l1-h2-m2"
