"""One trial per family on a small synthetic set (10 classes, chance 10%): test accuracy must end above 30%.
With 500 test images, chance accuracy has standard deviation 1.3 points, so 30% is 15 sigma from luck."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_VIT, TINY_VIT, cli_main
from raybench.configs import ConfigError, DataSpec, ResNetConfig, SwinConfig, TrialSpec, default_recipe
from raybench.records import DIVERGED, OK
from raybench.train import Trial, lr_at, resolve_precision

CHANCE_BEATEN = 0.30


def run(spec, data, **kw):
    trial = Trial(spec, device="cpu", threads=1, dataset=data, **kw)
    return trial, list(trial.epochs())


def spec_for(model, epochs=3, precision="fp32", **recipe):
    """fp32 unless a test is about precision: at these tiny sizes bf16 autocast ("auto" on a CPU with AMX or
    AVX-512-BF16) is slower than fp32 (docs/benchmarks.md); AMX pays off only at the study's sizes."""
    r = dataclasses.replace(default_recipe("seed", model), epochs=epochs, **recipe)
    return TrialSpec(model, r, DataSpec("synthetic", train_size=2000, test_size=500), seed=0, precision=precision)


# Epochs per family: the fewest that still clear CHANCE_BEATEN by a wide margin (the accuracies each reached
# are in docs/benchmarks.md, "The smoke study and the test suite").
@pytest.mark.parametrize("model, recipe", [
    (SMALL_VIT, {"epochs": 1}),
    # The ImageNet stem shrinks 32x32 inputs 4x before the first block: 15x fewer FLOPs than the CIFAR stem
    # (same blocks, same head), which keeps this test short on two CPU cores; one epoch clears the 30%
    # threshold by a wide margin.
    (ResNetConfig("imagenet", num_classes=10), {"epochs": 1}),
    # The tiny Swin's "pretrained" weights are random, so its frozen features are weaker than real ones:
    # the head gets a larger learning rate than the study's 2e-5 to move in 3 short epochs.
    ("swin-ft", {"lr": 3e-3}),
    ("swin-scratch", {"lr": 1e-3, "epochs": 2}),
], ids=["vit", "resnet18", "swin-ft", "swin-scratch"])
def test_every_family_learns_the_synthetic_set(model, recipe, small_synthetic, tiny_swin_dir):
    if isinstance(model, str):
        model = SwinConfig(tiny_swin_dir, finetune=model == "swin-ft", num_classes=10)
    spec = spec_for(model, **recipe)
    _, recs = run(spec, small_synthetic)
    assert [r["epoch"] for r in recs] == list(range(1, spec.recipe.epochs + 1))
    assert recs[-1]["status"] == OK
    assert recs[-1]["test_acc"] > CHANCE_BEATEN, recs
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "train_time_s", "eval_time_s",
                "images_per_s", "peak_memory_mb", "lr"):
        assert recs[-1][key] >= 0, key


def test_the_improved_recipe_warms_up_linearly_then_decays_along_a_cosine_to_zero():
    r = default_recipe("improved", TINY_VIT)
    per_epoch = 10
    total = per_epoch * r.epochs
    lrs = [lr_at(step, total, per_epoch, r) for step in range(total)]
    warm = int(r.warmup_epochs * per_epoch)
    assert lrs[:warm] == pytest.approx([r.lr * (s + 1) / warm for s in range(warm)])
    assert max(lrs) == lrs[warm] == pytest.approx(r.lr)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never up again after the warm-up
    assert lrs[warm + (total - warm) // 2] == pytest.approx(r.lr / 2)  # half-way down the cosine: half the peak
    assert lrs[-1] < r.lr / 1000
    seed = default_recipe("seed", TINY_VIT)
    assert {lr_at(step, total, per_epoch, seed) for step in range(total)} == {seed.lr}


def test_same_seed_same_numbers_on_cpu(small_synthetic):
    spec = spec_for(TINY_VIT, epochs=2, augment=("crop", "flip"))
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    a = [[r[k] for k in keys] for r in run(spec, small_synthetic)[1]]
    b = [[r[k] for k in keys] for r in run(spec, small_synthetic)[1]]
    assert a == b


def test_resuming_from_a_checkpoint_repeats_the_uninterrupted_run(small_synthetic, tmp_path):
    spec = spec_for(TINY_VIT, epochs=3, augment=("flip",),
                    schedule="cosine", warmup_epochs=1.0, optimizer="adamw")
    _, full = run(spec, small_synthetic)
    first = Trial(spec, device="cpu", threads=1, dataset=small_synthetic)
    it = first.epochs()
    next(it)
    first.save(tmp_path / "state.pt")  # loads back with weights_only=True
    resumed = Trial(spec, device="cpu", threads=1, dataset=small_synthetic)
    resumed.load(tmp_path / "state.pt")
    rest = list(resumed.epochs())
    assert [r["epoch"] for r in rest] == [2, 3]
    assert [r["test_acc"] for r in rest] == [r["test_acc"] for r in full[1:]]
    assert rest[-1]["train_loss"] == pytest.approx(full[-1]["train_loss"], rel=1e-6)


def test_a_diverging_run_stops_with_status_diverged(small_synthetic):
    _, recs = run(spec_for(TINY_VIT, epochs=3, lr=1e12), small_synthetic)
    assert recs[-1]["status"] == DIVERGED and "non-finite" in recs[-1]["error"]
    assert len(recs) < 3


def test_a_trial_restored_after_it_ended_trains_no_more(small_synthetic, tmp_path):
    for spec, status in ((spec_for(TINY_VIT, epochs=1), OK),
                         (spec_for(TINY_VIT, epochs=3, lr=1e12), DIVERGED)):
        ended, recs = run(spec, small_synthetic)
        assert recs[-1]["status"] == status
        ended.save(tmp_path / "state.pt")
        restored = Trial(spec, device="cpu", threads=1, dataset=small_synthetic)
        restored.load(tmp_path / "state.pt")
        assert restored.status == status and list(restored.epochs()) == []


def test_precision_is_taken_as_asked_and_auto_follows_the_cpu_flags():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    try:  # read here from the kernel's own list, not through torch, to check what torch told the trainer
        flags = set(next(l for l in Path("/proc/cpuinfo").read_text().splitlines()
                         if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32"), sorted(flags)
    with pytest.raises(ConfigError, match=r"precision='fp16'.*'auto', 'bf16', 'fp32'"):
        resolve_precision("fp16", cpu)


def test_bf16_and_fp32_learn_alike_and_every_record_says_which_ran(small_synthetic):
    spec = spec_for(TINY_VIT, epochs=3, precision="auto")
    runs = {p: run(dataclasses.replace(spec, precision=p), small_synthetic)[1] for p in ("fp32", "bf16")}
    for p, recs in runs.items():
        assert [r["precision"] for r in recs] == [p] * 3 and recs[-1]["status"] == OK
    fp32, bf16 = runs["fp32"][-1], runs["bf16"][-1]
    assert fp32["test_acc"] > CHANCE_BEATEN  # both learnt, so "alike" compares two results that mean something
    assert abs(bf16["test_acc"] - fp32["test_acc"]) <= 0.03, (bf16["test_acc"], fp32["test_acc"])
    assert bf16["train_loss"] != fp32["train_loss"]  # bf16 really ran: its rounding moves the loss
    _, auto = run(spec, small_synthetic)
    assert auto[0]["precision"] == resolve_precision("auto", torch.device("cpu"))


def test_cli_prints_a_line_per_epoch():
    r = subprocess.run([sys.executable, "-m", "raybench.train", "--model", "vit", "--patch", "8", "--dim", "32",
                        "--depth", "1", "--heads", "2", "--mlp-ratio", "2", "--epochs", "2", "--dataset",
                        "synthetic", "--train-size", "500", "--test-size", "100", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("epoch 1/2" in l for l in lines) == 1 and sum("epoch 2/2" in l for l in lines) == 1
    recs = [json.loads(l) for l in lines if l.startswith("{")]
    assert [x["epoch"] for x in recs] == [1, 2] and recs[-1]["device"] == "cpu"


def test_cli_takes_a_precision_and_refuses_an_unknown_one(capsys):
    # in this process: the test above runs the command as a shell does, the one below a refusal
    from raybench.train import main
    base = ["--name", "vit-p8-e32-l1-h2-m2", "--epochs", "1", "--train-size", "200", "--test-size", "50", "--json"]
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        assert main([*base, "--precision", "fp32", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets its process's threads
    out = capsys.readouterr().out
    assert [json.loads(l)["precision"] for l in out.splitlines() if l.startswith("{")] == ["fp32"]
    assert "device cpu (fp32)" in out
    rc, err = cli_main(capsys, main, *base, "--precision", "fp16")
    assert rc == 2 and "'fp16'" in err and "bf16" in err and "Traceback" not in err


def test_cli_reports_bad_values_and_missing_data_without_a_traceback(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "raybench.train", "--model", "vit", "--heads", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "heads=3" in r.stderr and "Traceback" not in r.stderr
    # the rest in this process (the one above shows what a shell sees; a fresh process each adds only imports)
    from raybench.train import main
    capsys.readouterr()
    assert main(["--name", "resnet18-cifar", "--dataset", "cifar100", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 is not in" in err and "Traceback" not in err
    for args, message in ((["--device", "gpu"], "device='gpu': expected cpu, cuda or cuda:N"),
                          (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)"),
                          (["--threads", "0"], "threads=0: must be >= 1")):
        threads = torch.get_num_threads()
        assert main(["--name", "vit-p8-e32-l1-h2-m2", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
        assert torch.get_num_threads() == threads  # refused before it touched this process's threads
