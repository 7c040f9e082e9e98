"""Models the study's dependencies provide, named in experiment files: `torchvision:<arch>`, `hf:<folder>`,
`py:<module>:<function>`. Everything is built here (a tiny HF ViT written with save_pretrained, a module
written to a temporary folder); nothing is downloaded."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import cli_main, grid_main, run_grid
from raybench.complexity import complexity, count_flops, measure
from raybench.configs import (ConfigError, DataSpec, HFConfig, PyConfig, Recipe, ResNetConfig, SwinConfig,
                              TorchvisionConfig, TrialSpec)
from raybench.experiments import ExperimentError, load_experiment
from raybench.models import build_model, check_model, check_weights
from raybench.models.hub import WeightsUnavailable
from raybench.sizing import feature_dim

MODULE = "raybench_test_user_models"  # one name for the session: Python imports a module once

USER_MODELS = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv 3->width (3x3) + BatchNorm + ReLU + global pool, then a linear head."""

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def small_cnn(width=8, num_classes=10):
    return SmallCNN(width, num_classes)


def no_split(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def fixed_head():  # ignores the class count: returns 7 logits
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))


def feature_map(num_classes=10):  # (B, classes, H, W), not logits
    return nn.Conv2d(3, num_classes, 3)


def not_a_module(num_classes=10):
    return {"layers": 3}
'''


@pytest.fixture(scope="session")
def user_folder(tmp_path_factory):
    """A folder with the user's module (and, by the tests, experiment files beside it)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(USER_MODELS)
    (folder / "raybench_test_broken.py").write_text("import a_package_nobody_installed\n")
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A 2-block HF ViT for 32x32 images, random weights, 10 labels, written by save_pretrained."""
    from transformers import ViTConfig as HFViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    cfg = HFViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_labels=10)
    path = tmp_path_factory.mktemp("tiny-vit")
    ViTForImageClassification(cfg).save_pretrained(path)
    return path


def experiment(folder, models, name="custom", epochs=1):
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "dataset": {"name": "synthetic", "train_size": 256,
                                                          "test_size": 128},
                                "num_classes": 10, "epochs": epochs, "models": models}))
    return path


# --- names and configs ------------------------------------------------------------------------------------

def test_names_say_the_source_and_what_trains(tiny_vit_dir, user_folder):
    exp = load_experiment(experiment(user_folder, [
        "torchvision:mobilenet_v3_small",
        {"name": "torchvision:resnet18", "image_size": 64},
        {"name": f"hf:{tiny_vit_dir}", "finetune": True},
        {"name": f"hf:{tiny_vit_dir}", "scratch": True},
        {"name": f"py:{MODULE}:small_cnn", "kwargs": {"width": 16}},
        {"name": f"py:{MODULE}:small_cnn", "finetune": True},
    ]))
    assert [t.model.name for t in exp.trials] == [
        "tv-mobilenet_v3_small", "tv-resnet18-64", f"hf-{tiny_vit_dir.name.lower()}-ft",
        f"hf-{tiny_vit_dir.name.lower()}-scratch", "py-small_cnn-width16", "py-small_cnn-ft"]
    assert [t.model.family for t in exp.trials] == ["torchvision"] * 2 + ["hf"] * 2 + ["py"] * 2
    assert [t.model.frozen_backbone for t in exp.trials] == [False, False, True, False, False, True]
    assert exp.trials[2].model.image_size == 32  # the checkpoint's config.image_size
    assert exp.trials[4].model.path == str(user_folder)  # recorded: Ray workers import from there too
    assert HFConfig("facebook/deit-tiny-patch16-224", finetune=True).name == "hf-deit-tiny-ft"
    assert HFConfig("facebook/deit-base-patch16-384").name == "hf-deit-base-384-pt"
    assert TorchvisionConfig("convnext_tiny", pretrained=True).name == "tv-convnext_tiny-pt"
    assert TorchvisionConfig("convnext_tiny", pretrained=True).image_size == 224


def test_new_configs_round_trip_through_the_param_space(tiny_vit_dir, user_folder):
    for model in (TorchvisionConfig("mobilenet_v3_small"), HFConfig(str(tiny_vit_dir), finetune=True),
                  PyConfig(MODULE, "small_cnn", {"width": 16, "sizes": [1, 2]}, str(user_folder))):
        spec = TrialSpec(model, Recipe(), DataSpec())
        d = json.loads(json.dumps(spec.to_dict()))  # what survives JSON survives Ray's param space
        assert TrialSpec.from_dict(d) == spec and hash(TrialSpec.from_dict(d).model) == hash(model)


# --- counted complexity, held to the closed forms --------------------------------------------------------

def test_torchvision_resnet18_counts_what_the_closed_form_says():
    tv, builtin = complexity(TorchvisionConfig("resnet18", image_size=224)), complexity(
        ResNetConfig("imagenet", image_size=224))
    assert tv.flops_source == "counted" and builtin.flops_source == "closed form"
    assert tv.params == builtin.params and tv.trainable_params == builtin.trainable_params
    assert abs(tv.flops - builtin.flops) <= 0.01 * builtin.flops


@pytest.mark.parametrize("finetune", [True, False], ids=["ft", "scratch"])
def test_hf_swin_counts_what_the_builtin_swin_formula_says(tiny_swin_dir, finetune):
    generic = HFConfig(tiny_swin_dir, finetune=finetune, scratch=not finetune)
    builtin = SwinConfig(tiny_swin_dir, finetune=finetune)
    g, b = complexity(generic), complexity(builtin)
    assert (g.params, g.trainable_params, g.input_size) == (b.params, b.trainable_params, b.input_size)
    assert abs(g.flops - b.flops) <= 0.01 * b.flops
    assert feature_dim(generic) == feature_dim(builtin) == 48  # 24 x 2 after one merge


def test_py_model_flops_are_counted_exactly(user_folder):
    cfg = PyConfig(MODULE, "small_cnn", {"width": 8}, str(user_folder), num_classes=10)
    cx = complexity(cfg)
    conv, head = 32 * 32 * (3 * 9) * 8, 8 * 10  # MACs per image
    assert cx.flops == 2 * (conv + head) and cx.flops_source == "counted"
    assert cx.params == cx.trainable_params == (3 * 9 * 8 + 8) + 2 * 8 + (8 * 10 + 10)
    ft = complexity(PyConfig(MODULE, "small_cnn", {"width": 8}, str(user_folder), finetune=True, num_classes=10))
    assert ft.params == cx.params and ft.trainable_params == 8 * 10 + 10  # only what forward_head uses


def test_torchvision_at_32px_is_counted_in_train_mode_as_in_eval_mode():
    cfg = TorchvisionConfig("mobilenet_v3_small", num_classes=10)
    check_model(cfg)
    model = build_model(cfg)
    assert (model.input_size, model.mean) == (32, None)  # from scratch: the dataset's own statistics
    assert model.classifier[-1].out_features == 10
    cx = complexity(cfg)
    counted = measure(model, 32)  # the cross-check: parameters and FLOPs counted on the model, torchinfo's mult-adds
    assert cx.params == counted["params"] == sum(p.numel() for p in model.parameters())
    assert cx.flops == counted["flops"] and cx.flops_by_part.keys() == {"convolution", "addmm"}
    model.eval()
    assert count_flops(model, 32) == cx.flops_by_part and not model.training  # counted in train mode, given back


def test_an_hf_model_is_built_once_for_all_the_figures_a_plan_takes_from_it(tiny_vit_dir):
    from raybench.models import measuring_model
    from raybench.sizing import input_side, step_flops, trial_memory_bytes
    model = check_model(HFConfig(str(tiny_vit_dir), scratch=True, num_classes=7))  # a config no test sized yet
    spec = TrialSpec(model, Recipe(batch_size=16), DataSpec(train_size=64, test_size=32))
    measuring_model.cache_clear()
    assert trial_memory_bytes(spec) > 0 and step_flops(spec) > 0 and input_side(spec) == 32
    assert feature_dim(model) == 32 and complexity(model).flops_source == "counted"
    assert measuring_model.cache_info().misses == 1


# --- the three kinds trained, checkpointed and resumed ------------------------------------------------------

def test_hf_folder_loads_its_weights_and_freezes_the_backbone(tiny_vit_dir):
    from safetensors.torch import load_file
    saved = load_file(tiny_vit_dir / "model.safetensors")
    key = "vit.embeddings.patch_embeddings.projection.weight"
    ft = build_model(HFConfig(str(tiny_vit_dir), finetune=True))
    assert torch.equal(ft.hf.state_dict()[key], saved[key])  # pretrained backbone, from the folder
    assert [n for n, p in ft.named_parameters() if p.requires_grad] == ["hf.classifier.weight", "hf.classifier.bias"]
    assert ft.hf.classifier.out_features == 100  # head replaced for the class count
    torch.manual_seed(1)
    scratch = build_model(HFConfig(str(tiny_vit_dir), scratch=True))
    assert not torch.equal(scratch.hf.state_dict()[key], saved[key])
    assert all(p.requires_grad for p in scratch.parameters())
    ft.train()
    assert not ft.hf.vit.training and ft.hf.classifier.training  # the frozen backbone stays in eval mode
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ft.forward_head(ft.forward_features(x)), ft(x))
        assert ft.forward_features(x).shape == (3, 32)  # what the classifier sees: the class token


@pytest.mark.parametrize("kind", ["torchvision", "hf-ft", "py"])
def test_a_trial_trains_checkpoints_and_resumes(tmp_path, tiny_vit_dir, user_folder, kind):
    from raybench.data import synthetic
    from raybench.train import Trial
    small_synthetic = synthetic(512, 256, num_classes=10)
    model = {"torchvision": TorchvisionConfig("mobilenet_v3_small", num_classes=10),
             "hf-ft": HFConfig(str(tiny_vit_dir), finetune=True, num_classes=10),
             "py": PyConfig(MODULE, "small_cnn", {"width": 8}, str(user_folder), num_classes=10)}[kind]
    spec = TrialSpec(model, Recipe(epochs=2, batch_size=64), DataSpec(train_size=512, test_size=256))
    straight = Trial(spec, dataset=small_synthetic, threads=1)
    records = list(straight.epochs())
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["status"] == "ok"
    half = Trial(spec, dataset=small_synthetic, threads=1)
    first = next(half.epochs())
    half.save(tmp_path / "ckpt.pt")  # loads back with weights_only=True
    resumed = Trial(spec, dataset=small_synthetic, threads=1)
    resumed.load(tmp_path / "ckpt.pt")
    second = list(resumed.epochs())
    assert first["train_loss"] == records[0]["train_loss"]
    assert [r["epoch"] for r in second] == [2]  # the resumed trial goes on where the checkpoint left off
    assert (second[0]["train_loss"], second[0]["test_acc"]) == (records[1]["train_loss"], records[1]["test_acc"])


# --- bad input, refused when the experiment loads -------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ("torchvision:convnext_tiniest", "models[0] (torchvision:convnext_tiniest): TorchvisionConfig.arch="
                                     "'convnext_tiniest': not a torchvision classification model; close matches: "
                                     "convnext_tiny"),
    ({"name": "torchvision:vit_b_16", "pretrained": True, "image_size": 32}, "fails in train mode"),
    ("py:raybench_test_nowhere:small_cnn", "module 'raybench_test_nowhere' does not import"),
    ("py:raybench_test_broken:small_cnn", "No module named 'a_package_nobody_installed'"),
    (f"py:{MODULE}:tiny_cnn", f"{MODULE} has no function 'tiny_cnn'; it defines"),
    (f"py:{MODULE}:not_a_module", "returned a dict, not a torch.nn.Module"),
    (f"py:{MODULE}:fixed_head", "gives a Tensor of shape (2, 7) in train mode; expected logits of shape (2, 10)"),
    (f"py:{MODULE}:feature_map", "shape (2, 10, 30, 30)"),
    ({"name": f"py:{MODULE}:no_split", "finetune": True}, "finetune needs a backbone/head split: give Sequential "
                                                          "the methods forward_features(x)"),
    ({"name": f"py:{MODULE}:small_cnn", "kwargs": {"depth": 3}}, "unexpected keyword argument 'depth'"),
    ({"name": f"py:{MODULE}:small_cnn", "kwargs": {"width": {"a": 1}}}, "values must be numbers"),
    ("py:small_cnn", "expected py:<module>:<function>"),
    ({"name": "hf:facebook/deit-tiny-patch16-224", "finetune": True, "scratch": True}, "choose one"),
])
def test_bad_models_fail_at_load_naming_the_entry(user_folder, entry, message):
    path = experiment(user_folder, [entry], name="bad")
    with pytest.raises(ExperimentError) as e:
        load_experiment(path)
    assert "models[0]" in str(e.value) and message in str(e.value), str(e.value)


def test_an_hf_folder_that_is_not_an_image_classifier_is_refused(tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    path = experiment(tmp_path, [f"hf:{tmp_path / 'bert'}"], name="bert")
    with pytest.raises(ExperimentError, match=r"models\[0\].*a 'bert' model, not an image classifier"):
        load_experiment(path)


def test_an_hf_model_trains_at_its_checkpoints_size(tiny_vit_dir):
    assert HFConfig(str(tiny_vit_dir)).image_size is None  # constructing a config reads no checkpoint
    assert check_model(HFConfig(str(tiny_vit_dir))).image_size == 32
    with pytest.raises(ConfigError, match="image_size=64: .* is trained at 32 px"):
        check_model(HFConfig(str(tiny_vit_dir), image_size=64))


def test_pretrained_weights_offline_fail_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="torchvision convnext_tiny weights are not cached at"):
        check_weights(TorchvisionConfig("convnext_tiny", pretrained=True))
    check_weights(TorchvisionConfig("convnext_tiny"))  # from scratch: nothing to fetch
    with pytest.raises(WeightsUnavailable, match="'facebook/deit-tiny-patch16-224' are not in the Hugging Face"):
        check_weights(HFConfig("facebook/deit-tiny-patch16-224", finetune=True))


# --- the command lines --------------------------------------------------------------------------------------

def test_complexity_cli_says_where_the_flops_come_from(user_folder, capsys, monkeypatch):
    out = subprocess.run([sys.executable, "-m", "raybench.complexity", "--name", f"py:{MODULE}:small_cnn",
                          "--kwargs", '{"width": 8}', "--num-classes", "10", "--json"], capture_output=True,
                         text=True, cwd=user_folder, check=True).stdout
    row = json.loads(out)
    assert (row["model"], row["flops_source"], row["flops"]) == ("py-small_cnn-width8", "counted",
                                                                 2 * (32 * 32 * 27 * 8 + 80))
    # the rest in this process, from the same working folder (a fresh process each adds only its imports)
    from raybench.complexity import main
    monkeypatch.chdir(user_folder)
    capsys.readouterr()
    assert main(["vit-p8-e32-l1-h2-m2", "torchvision:mobilenet_v3_small"]) == 0
    table = capsys.readouterr().out
    assert "FLOPs from" in table
    assert [line.split()[-1] for line in table.splitlines() if line.startswith(("vit-", "tv-"))] == [
        "form", "counted"]  # "closed form", "counted"
    rc, err = cli_main(capsys, main, "--name", f"py:{MODULE}:fixed_head")
    assert rc == 2 and "expected logits of shape (2, 100)" in err and "Traceback" not in err


def test_train_cli_trains_a_py_model_from_the_working_folder(user_folder):
    r = subprocess.run([sys.executable, "-m", "raybench.train", "--name", f"py:{MODULE}:small_cnn", "--finetune",
                        "--epochs", "1", "--train-size", "256", "--test-size", "128", "--num-classes", "10",
                        "--threads", "1"], capture_output=True, text=True, cwd=user_folder, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[py-small_cnn-ft-seed] epoch 1/1" in r.stdout


# --- one grid run: all three beside a built-in ViT ------------------------------------------------------------

@pytest.mark.slow
def test_grid_runs_all_three_kinds_beside_a_vit(tmp_path, tiny_vit_dir, user_folder):
    from raybench.analysis import load_run
    exp = experiment(user_folder, ["vit-p8-e32-l1-h2-m2", "torchvision:mobilenet_v3_small",
                                   {"name": f"hf:{tiny_vit_dir}", "finetune": True},
                                   {"name": f"py:{MODULE}:small_cnn", "kwargs": {"width": 8}}],
                     name="grid-custom", epochs=2)
    # --gpus 1 on a machine without CUDA: the GPU-share rule sizes every trial (measured activations), and
    # the trials train on the CPU
    r = run_grid("--experiment", exp, "--gpus", 1, "--results-dir", tmp_path, "--name", "custom",
                 "--no-analysis", "--no-dashboard", cwd=tmp_path)  # not the module's folder: the config says where
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = load_run(tmp_path / "custom")
    trials = run.trials.set_index("model")
    expected = {"vit-p8-e32-l1-h2-m2": ("vit", "closed form"), "tv-mobilenet_v3_small": ("torchvision", "counted"),
                f"hf-{tiny_vit_dir.name.lower()}-ft": ("hf", "counted"),
                "py-small_cnn-width8": ("py", "counted")}
    assert {m: (trials.family[m], trials.flops_source[m]) for m in trials.index} == expected
    specs = {t.model.name: t.model for t in load_experiment(exp).trials}
    for m in expected:
        cx = complexity(specs[m])
        assert (trials.params[m], trials.trainable_params[m], trials.flops[m]) == (
            cx.params, cx.trainable_params, cx.flops)
        assert 0 < trials.gpu_fraction[m] <= 1
    assert trials.finetune.to_dict() == {m: m.startswith("hf-") for m in expected}
    assert trials.patch.isna().sum() == 3  # ViT knob columns stay empty for the others
    assert (trials.status == "ok").all()
    assert set(zip(run.epochs.trial, run.epochs.epoch)) == {(t, e) for t in run.trials.trial for e in (1, 2)}


def test_the_example_adds_two_models_to_the_seed_study_and_offline_is_refused_before_ray(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision weights cached
    custom, seed = load_experiment("seed-custom"), load_experiment("seed")
    assert [t.name for t in custom.trials] == [t.name for t in seed.trials] + [
        "tv-convnext_tiny-pt-seed", "hf-deit-tiny-ft-seed"]
    deit = custom.trials[-1]
    assert (deit.recipe.batch_size, deit.recipe.lr, deit.recipe.epochs) == (32, 2e-5, 3)  # as the Swins
    refused = []
    for model in dict.fromkeys(t.model for t in custom.trials[len(seed.trials):]):
        with pytest.raises(WeightsUnavailable):  # what the grid's preflight runs, before Ray starts
            check_weights(model)
        refused.append(model.name)
    assert refused == ["tv-convnext_tiny-pt", "hf-deit-tiny-ft"]


@pytest.mark.parametrize("gpus", [0, 1])  # 1: the GPU-share rule needs the model's size first
def test_the_grid_refuses_an_hf_checkpoint_it_cannot_get_before_ray_starts(tmp_path, capsys, gpus):
    exp = experiment(tmp_path, [{"name": "hf:facebook/deit-tiny-patch16-224", "finetune": True}], name="offline")
    rc, err = grid_main(capsys, "--experiment", exp, "--gpus", gpus, "--results-dir", tmp_path / "res")
    assert rc == 2 and "'facebook/deit-tiny-patch16-224' are not in the Hugging Face cache" in err
    assert "Traceback" not in err and not (tmp_path / "res").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "vit", "--finetune"], "--finetune applies to hf:<checkpoint> and py:<module>:<function> names"),
    (["--name", "resnet18-cifar", "--kwargs", '{"width": 8}'], "applies to py:<module>:<function> names only"),
    (["--name", f"py:{MODULE}:small_cnn", "--kwargs", "{width: 8}"], "--kwargs='{width: 8}': not JSON"),
    (["--name", "torchvision:resnet19"], "close matches: resnet18"),
])
def test_cli_flags_for_the_new_names_are_checked(user_folder, monkeypatch, capsys, args, message):
    from raybench.complexity import main
    monkeypatch.chdir(user_folder)
    assert main(args) == 2 and message in capsys.readouterr().err
