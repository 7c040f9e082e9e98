import pytest

from raybench.configs import (ConfigError, DataSpec, Recipe, ResNetConfig, SwinConfig, TrialSpec, ViTConfig,
                              default_recipe, parse_model_name, study_models, vit_grid)


def test_names_follow_the_study():
    assert ViTConfig(4, 256, 8, 2, 2).name == "vit-p4-e256-l8-h2-m2"
    assert ViTConfig(8, 512, 4, 4, 4).name == "vit-p8-e512-l4-h4-m4"
    assert ResNetConfig().name == "resnet18-cifar"
    assert ResNetConfig("imagenet", True, image_size=224).name == "resnet18-imagenet-pt"
    # an unusual input size is part of the name: configs that differ never share one
    assert ResNetConfig("imagenet", image_size=224).name == "resnet18-imagenet-224"
    assert ResNetConfig("imagenet", True, image_size=32).name == "resnet18-imagenet-pt-32"
    assert ViTConfig(4, 256, 8, 2, 2, dropout=0.1, image_size=64).name == "vit-p4-e256-l8-h2-m2-d0p1-64"
    assert SwinConfig().name == "swin-tiny-ft"
    assert SwinConfig("microsoft/swin-small-patch4-window7-224", finetune=False).name == "swin-small-scratch"


def test_every_name_parses_back_to_its_config():
    for cfg in [*study_models(), ResNetConfig("imagenet", image_size=224), ResNetConfig(image_size=64),
                ResNetConfig("imagenet", True, image_size=32), ViTConfig(4, 256, 8, 2, 2, dropout=0.1),
                ViTConfig(8, 64, 1, 2, 2.5, dropout=0.25, image_size=64)]:
        assert parse_model_name(cfg.name) == cfg


def test_the_vit_grid_has_32_distinct_configs():
    names = [c.name for c in vit_grid()]
    assert len(names) == len(set(names)) == 32


@pytest.mark.parametrize("kwargs, field", [
    (dict(patch=5), "patch=5"),            # 5 does not divide 32
    (dict(heads=3), "heads=3"),            # 3 does not divide 256
    (dict(dim=0), "dim=0"),
    (dict(depth=-1), "depth=-1"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(mlp_ratio=float("inf")), "mlp_ratio=inf: must be a finite positive number"),  # from `--mlp-ratio inf`
])
def test_bad_vit_configs_name_the_field_and_value(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace("=", r".*=")):
        ViTConfig(**kwargs)


def test_bad_recipe_and_data_values_are_rejected():
    with pytest.raises(ConfigError, match="optimizer='sgd'.*adam"):
        Recipe(optimizer="sgd")
    with pytest.raises(ConfigError, match="unknown \\['rotate'\\]"):
        Recipe(augment=("crop", "rotate"))
    with pytest.raises(ConfigError, match="name='imagenet'"):
        DataSpec(name="imagenet")
    with pytest.raises(ConfigError, match="stem='imagenet'"):
        ResNetConfig(stem="cifar", pretrained=True)
    with pytest.raises(ConfigError, match="model name 'vit-p4'"):
        parse_model_name("vit-p4")


def test_configs_name_files_that_are_read_when_an_experiment_loads():
    from raybench.models import check_model
    scratch = SwinConfig("nosuch", finetune=False)  # constructing a config reads no file
    with pytest.raises(ConfigError, match="checkpoint='nosuch'.*config.json"):
        check_model(scratch)


def test_trial_specs_round_trip_through_plain_dicts():
    for model in study_models()[::5]:
        spec = TrialSpec(model, default_recipe("improved", model), DataSpec("synthetic", train_size=100), seed=3)
        d = spec.to_dict()
        assert TrialSpec.from_dict(d) == spec
        assert all(isinstance(v, (str, int, float, bool, list, dict, type(None))) for v in d["recipe"].values())


def test_swin_recipes_use_the_study_fine_tuning_settings():
    r = default_recipe("seed", SwinConfig())
    assert (r.batch_size, r.lr, r.epochs, r.optimizer) == (32, 2e-5, 3, "adam")
    r = default_recipe("seed", ViTConfig())
    assert (r.batch_size, r.lr, r.optimizer, r.schedule, r.augment) == (64, 1e-3, "adam", "constant", ())


def test_only_a_fine_tuned_swin_has_a_frozen_backbone():
    frozen = {cfg.name: cfg.frozen_backbone for cfg in [*study_models(), SwinConfig(),
                                                        ResNetConfig("imagenet", True, image_size=224)]}
    assert {n for n, f in frozen.items() if f} == {"swin-tiny-ft"}
    assert SwinConfig(finetune=False).frozen_backbone is False


def test_precision_is_validated_serialised_and_named_only_when_set():
    model = ViTConfig(8, 32, 1, 2, 2.0)
    auto = TrialSpec(model, default_recipe("seed", model))
    assert auto.precision == "auto" and auto.name == "vit-p8-e32-l1-h2-m2-seed"
    fp32 = TrialSpec(model, default_recipe("seed", model), seed=1, multi_seed=True, precision="fp32")
    assert fp32.name == "vit-p8-e32-l1-h2-m2-seed-fp32-s1"
    assert TrialSpec.from_dict(fp32.to_dict()) == fp32
    old = {k: v for k, v in auto.to_dict().items() if k != "precision"}  # a run written before the setting
    assert TrialSpec.from_dict(old).precision == "auto"
    with pytest.raises(ConfigError, match=r"TrialSpec.precision='fp16': must be one of \['auto', 'bf16', 'fp32'\]"):
        TrialSpec(model, default_recipe("seed", model), precision="fp16")


def test_constructing_configs_reads_nothing_and_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys; from raybench.configs import *; "
            "cfgs = [TorchvisionConfig('no_such_arch'), HFConfig('no-such/checkpoint'), "
            "SwinConfig('/no/folder', False), parse_model_name('hf:./no-folder'), parse_model_name('py:mod:fn')]; "
            "assert cfgs[1].image_size is None and cfgs[4].path is None; "
            "assert not {'torch', 'torchvision', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
