"""The closed-form figures must match what the built models count: parameters exactly, FLOPs within 1%."""
import json
import subprocess
import sys

import pytest

from conftest import cli_main
from raybench.complexity import complexity, main, measure
from raybench.configs import ResNetConfig, SwinConfig, study_models
from raybench.models import build_model

STUDY = study_models()


@pytest.mark.parametrize("cfg", STUDY, ids=[c.name for c in STUDY])
def test_formula_matches_the_built_model(cfg):
    cx = complexity(cfg)
    counted = measure(build_model(cfg, weights=False), cx.input_size)
    assert cx.params == counted["params"]
    assert cx.trainable_params == counted["trainable_params"]
    assert abs(cx.flops - counted["flops"]) <= 0.01 * counted["flops"]


def test_swin_fine_tune_trains_only_the_head(tiny_swin_dir):
    ft, scratch = SwinConfig(tiny_swin_dir, finetune=True), SwinConfig(tiny_swin_dir, finetune=False)
    m = measure(build_model(ft), 32)  # loaded through from_pretrained, head replaced for 100 classes
    assert complexity(ft).params == m["params"] == complexity(scratch).params
    assert complexity(ft).trainable_params == m["trainable_params"] == 48 * 100 + 100  # final width: 24 x 2 after one merge
    assert abs(complexity(ft).flops - m["flops"]) <= 0.01 * m["flops"]


def test_resnet_pretrained_input_is_224():
    cx = complexity(ResNetConfig("imagenet", True, image_size=224))
    assert cx.input_size == 224
    assert 3.5e9 < cx.flops < 3.7e9  # 1.8 GMACs, torchvision's published figure for ResNet-18


def test_cli_prints_json_for_one_vit():
    out = subprocess.run([sys.executable, "-m", "raybench.complexity", "--model", "vit", "--patch", "8",
                          "--dim", "256", "--depth", "4", "--heads", "2", "--mlp-ratio", "2", "--json"],
                         capture_output=True, text=True, check=True).stdout
    row = json.loads(out)
    assert row["model"] == "vit-p8-e256-l4-h2-m2"
    assert row["params"] == next(complexity(c).params for c in STUDY if c.name == row["model"])
    assert row["flops"] == sum(row["flops_by_part"].values())


def test_cli_rejects_a_bad_config_by_name():
    r = subprocess.run([sys.executable, "-m", "raybench.complexity", "--model", "vit", "--patch", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "patch=5" in r.stderr and "Traceback" not in r.stderr


def test_cli_names_a_bad_model_or_experiment(tmp_path, capsys):
    # in this process (cli_main): the test above shows what a shell sees
    rc, err = cli_main(capsys, main, "vit-p4-e2")
    assert rc == 2 and "vit-p4-e2" in err and "experiment" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [resnet18-cifar]\nnum_classes: ten\n")
    rc, err = cli_main(capsys, main, bad)
    assert rc == 2 and "num_classes='ten'" in err and "Traceback" not in err
