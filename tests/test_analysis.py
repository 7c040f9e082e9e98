"""raybench.analysis on run folders written here the way docs/results.md describes them.

`write_run` is the contract in executable form: one trials.parquet row and a list of epochs.parquet rows per
trial, every documented column filled. The tests then check the analysis against the rows it read: table
numbers, statements that flip when the data flips, partial runs, bad folders, the CLI and the notebook.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.colors import to_hex

from conftest import cli_main
from raybench.analysis import (analyse, caveats, family_colors, find_run_dir, findings, load_run, make_plots,
                               summary_tables, write_report)
from raybench.configs import ResNetConfig, SwinConfig, ViTConfig, parse_model_name
from raybench.records import FAILED, STOPPED_EARLY

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "analysis.ipynb"


# ------------------------------------------------------------------------------------------- run folders
def _complexity(cfg) -> tuple[int, int, float]:
    """(params, trainable params, forward FLOPs per image): plausible sizes, not raybench's closed form; the
    analysis only reads these columns, so any consistent numbers do."""
    if isinstance(cfg, ViTConfig):
        t, d = cfg.num_patches, cfg.dim
        block = 4 * d * d + 2 * d * cfg.mlp_hidden
        params = cfg.depth * block + 3 * cfg.patch ** 2 * d + (t + 1) * d + d * cfg.num_classes
        return params, params, 2.0 * (cfg.depth * ((t + 1) * block + 2 * (t + 1) ** 2 * d) + t * 3 * cfg.patch ** 2 * d)
    if isinstance(cfg, ResNetConfig):
        return 11_220_132, 11_220_132, 1.11e9
    params, flops = {"tiny": (27_596_254, 8.7e9), "small": (48_914_722, 17.1e9)}[cfg.short]
    return params, (768 * 100 + 100 if cfg.finetune else params), flops


def trial(model: str, recipe: str = "seed", final: float = 0.4, *, seed: int = 0, multi_seed: bool = False,
          epochs: int | None = None, done: int | None = None, status: str = "ok", error: str = "",
          time_s: float = 2.0, peak: bool = False) -> tuple[dict, list[dict]]:
    """One trial: its trials.parquet row and its epoch rows. Accuracy rises to `final` at the last epoch run
    (`peak`: one epoch before the last is 2 points higher, so best != final); epoch times vary around time_s."""
    cfg = parse_model_name(model)
    swin = isinstance(cfg, SwinConfig)
    epochs = epochs or (3 if swin else 12)
    done = epochs if done is None else done
    name = f"{model}-{recipe}" + (f"-s{seed}" if multi_seed else "")
    rows = []
    for e in range(1, done + 1):
        acc = final * (1 - 0.5 ** e) / (1 - 0.5 ** done) + (0.02 if peak and e == done - 1 else 0.0)
        t = time_s * (1.5 if e == 1 else 1 + 0.1 * (e % 3 - 1))
        rows.append(dict(trial=name, epoch=e, train_loss=4.6 * (1 - acc), test_loss=4.7 * (1 - acc),
                         train_acc=min(1.0, acc * 1.1), test_acc=acc, train_time_s=t, eval_time_s=t / 5,
                         images_per_s=50_000 / t, cache_time_s=0.0, compile_time_s=0.0, peak_memory_mb=900.0,
                         lr=1e-3, node_id="node-a"))
    params, trainable, flops = _complexity(cfg)
    accs = [r["test_acc"] for r in rows]
    row = dict(
        trial=name, model=model, family=cfg.family, recipe=recipe, seed=seed,
        patch=getattr(cfg, "patch", None), dim=getattr(cfg, "dim", None), depth=getattr(cfg, "depth", None),
        heads=getattr(cfg, "heads", None), mlp_ratio=getattr(cfg, "mlp_ratio", None),
        stem=getattr(cfg, "stem", None), pretrained=bool(getattr(cfg, "pretrained", False) or
                                                          getattr(cfg, "finetune", False)),
        finetune=bool(getattr(cfg, "finetune", False)), swin_size=cfg.short if swin else None, params=params,
        trainable_params=trainable, flops=flops, flops_source="closed form",
        gflops=flops / 1e9, image_size=224 if swin else 32, batch_size=32 if swin else 64, lr=1e-3,
        optimizer="adam", epochs=epochs, gpu_fraction=0.25, cpus=1.0, device="NVIDIA H100 80GB HBM3",
        dataset="synthetic", synthetic=True, status=status, error=error, epochs_done=len(rows),
        final_test_acc=accs[-1] if accs else None, best_test_acc=max(accs) if accs else None,
        test_acc_at_10=accs[9] if len(accs) >= 10 else None,
        mean_epoch_time_s=sum(r["train_time_s"] for r in rows) / len(rows) if rows else None,
        total_time_s=sum(r["train_time_s"] + r["eval_time_s"] for r in rows), torch_version="2.14.1",
        ray_version="2.50.0", transformers_version="4.57.0", git_commit="3287166")
    return row, rows


def write_run(folder: Path, trials: list[tuple[dict, list[dict]]], epochs_file: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = pd.DataFrame([row for row, _ in trials])
    for c in ("patch", "dim", "depth", "heads"):  # int, nullable
        t[c] = t[c].astype("Int64")
    t["mlp_ratio"] = t["mlp_ratio"].astype("Float64")
    t.to_parquet(folder / "trials.parquet", index=False)
    if epochs_file:
        pd.DataFrame([r for _, rows in trials for r in rows]).to_parquet(folder / "epochs.parquet", index=False)
    return folder


def other_family(model: str, family: str, final: float, *, params: int, flops: float, image_size: int = 32,
                 pretrained: bool = False, finetune: bool = False) -> tuple[dict, list[dict]]:
    """A trial of a family raybench has no name parser for (torchvision, hf, py): what it is comes from its
    columns alone, and its FLOPs are counted, not closed-form."""
    row, rows = trial(VITS[0], final=final)  # epoch rows shaped like any trial's
    name = f"{model}-{row['recipe']}"
    row.update(trial=name, model=model, family=family, patch=None, dim=None, depth=None, heads=None,
               mlp_ratio=None, stem=None, pretrained=pretrained, finetune=finetune, params=params,
               trainable_params=params, flops=flops, gflops=flops / 1e9, image_size=image_size,
               flops_source="counted")
    return row, [{**r, "trial": name} for r in rows]


VITS = [f"vit-p{p}-e{d}-l{l}-h2-m2" for p in (4, 8) for d in (128, 256) for l in (4, 8)]


def vit_acc(model: str) -> float:
    cfg = parse_model_name(model)  # smaller patches, wider, deeper: each worth a few points
    return 0.30 + 0.05 * (cfg.patch == 4) + 0.03 * (cfg.dim == 256) + 0.02 * (cfg.depth == 8)


def study_trials() -> list[tuple[dict, list[dict]]]:
    """A finished study in miniature: 8 ViTs (one with 3 seeds), ResNet-18, Swin T/S, both recipes for a few
    models, a diverged ViT and a Swin that ran out of memory."""
    seeded = "vit-p4-e128-l4-h2-m2"
    out = [trial(m, final=vit_acc(m), time_s=1 + parse_model_name(m).num_patches / 16, peak=(m == VITS[-1]))
           for m in VITS if m != seeded]
    out += [trial(seeded, final=vit_acc(seeded) + d, seed=s, multi_seed=True, time_s=5.0)
            for s, d in ((0, -0.01), (1, 0.0), (2, 0.025))]
    out += [trial("vit-p4-e256-l8-h2-m2", "improved", 0.45, time_s=5.0),
            trial("vit-p8-e128-l4-h2-m2", "improved", 0.33, time_s=1.5),
            trial("resnet18-cifar", final=0.38, time_s=3.0), trial("resnet18-cifar", "improved", 0.50, time_s=3.0),
            trial("vit-p4-e256-l8-h4-m2", final=0.05, done=3, status="diverged",
                  error="loss is nan at epoch 3 (lr 0.001)"),
            trial("swin-tiny-ft", final=0.60, time_s=20.0), trial("swin-tiny-scratch", final=0.10, time_s=35.0),
            trial("swin-small-ft", final=0.65, time_s=31.0),
            trial("swin-small-scratch", done=0, status="oom", error="CUDA out of memory. Tried to allocate 2.00 GiB")]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder of the whole study (some trials failed); the notebook test analyses it too."""
    return write_run(tmp_path_factory.mktemp("results") / "study", study_trials())


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return analyse(run_dir)


def finding(run, topic):
    return {f.topic: f for f in findings(run)}.get(topic)


# ------------------------------------------------------------------------------------------- tables
def test_vit_resnet_table_is_the_epoch_rows(run_dir):
    run = load_run(run_dir)
    table = summary_tables(run)["vit_resnet"].set_index(["model", "recipe"])
    epochs, trials = pd.read_parquet(run_dir / "epochs.parquet"), pd.read_parquet(run_dir / "trials.parquet")
    for name in ("vit-p8-e256-l8-h2-m2-seed", "vit-p4-e256-l8-h2-m2-improved", "resnet18-cifar-seed"):
        rows = epochs[epochs["trial"] == name].sort_values("epoch")
        t = trials.set_index("trial").loc[name]
        got = table.loc[(t["model"], t["recipe"])]
        assert got["n"] == 1
        assert got["mean_epoch_time_s"] == pytest.approx(rows["train_time_s"].mean())
        assert got["test_acc_at_10"] == pytest.approx(rows.loc[rows["epoch"] == 10, "test_acc"].item())
        assert got["final_test_acc"] == pytest.approx(rows["test_acc"].iloc[-1])
        assert got["best_test_acc"] == pytest.approx(rows["test_acc"].max())
        assert got["params"] == t["params"] and got["gflops"] == pytest.approx(t["flops"] / 1e9)
    peaked = table.loc[(VITS[-1], "seed")]  # the one curve that peaks before its last epoch
    assert peaked["best_test_acc"] > peaked["final_test_acc"]
    # The diverged ViT is not a configuration result; it shows in the trials table with its error.
    assert ("vit-p4-e256-l8-h4-m2", "seed") not in table.index
    every = summary_tables(run)["per_trial"].set_index("trial")
    assert every.loc["vit-p4-e256-l8-h4-m2-seed", "status"] == "diverged"
    assert "loss is nan" in every.loc["vit-p4-e256-l8-h4-m2-seed", "error"]


def test_seeds_table_mean_std_n(run_dir):
    run = load_run(run_dir)
    tables = summary_tables(run)
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    names = [f"vit-p4-e128-l4-h2-m2-seed-s{s}" for s in range(3)]
    per_seed = epochs[epochs["trial"].isin(names)].sort_values("epoch").groupby("trial")
    final, time = per_seed["test_acc"].last(), per_seed["train_time_s"].mean()
    seeds = tables["seeds"].set_index("model").loc["vit-p4-e128-l4-h2-m2"]
    assert seeds["n"] == 3 and seeds["seeds"] == "0, 1, 2"
    assert seeds["final_test_acc_mean"] == pytest.approx(final.mean())
    assert seeds["final_test_acc_std"] == pytest.approx(final.std(ddof=1))
    assert seeds["mean_epoch_time_s_mean"] == pytest.approx(time.mean())
    assert len(tables["seeds"]) == 1  # every other configuration ran one seed
    main = tables["vit_resnet"].set_index(["model", "recipe"]).loc[("vit-p4-e128-l4-h2-m2", "seed")]
    assert main["n"] == 3 and main["final_test_acc"] == pytest.approx(final.mean())


def test_swin_table(run_dir):
    swin = summary_tables(load_run(run_dir))["swin"].set_index("model")
    trials = pd.read_parquet(run_dir / "trials.parquet").set_index("model")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert set(swin.index) == {"swin-tiny-ft", "swin-tiny-scratch", "swin-small-ft"}  # small-scratch: OOM
    for model, row in swin.iterrows():
        rows = epochs[epochs["trial"] == f"{model}-seed"]
        assert row["trainable_params"] == trials.loc[model, "trainable_params"]
        assert row["params"] == trials.loc[model, "params"]
        assert row["mean_epoch_time_s"] == pytest.approx(rows["train_time_s"].mean())
        assert row["final_test_acc"] == pytest.approx(rows.sort_values("epoch")["test_acc"].iloc[-1])
    assert swin.loc["swin-tiny-ft", "trainable_params"] < swin.loc["swin-tiny-ft", "params"]


def test_a_swin_trials_time_includes_its_one_off_feature_pass(tmp_path):
    ft, scratch = trial("swin-tiny-ft", final=0.6, time_s=2.0), trial("swin-tiny-scratch", final=0.1, time_s=20.0)
    for r in ft[1]:
        r["cache_time_s"] = 100.0 if r["epoch"] == 1 else 0.0  # the feature pass, paid in the first epoch
    run = load_run(write_run(tmp_path, [ft, scratch]))
    swin = summary_tables(run)["swin"].set_index("model")
    whole = {m: sum(r["train_time_s"] + r["eval_time_s"] for r in rows) for m, rows in
             (("swin-tiny-ft", ft[1]), ("swin-tiny-scratch", scratch[1]))}
    assert swin.loc["swin-tiny-ft", "total_time_s"] == pytest.approx(whole["swin-tiny-ft"] + 100.0)
    assert swin.loc["swin-tiny-scratch", "total_time_s"] == pytest.approx(whole["swin-tiny-scratch"])
    text = finding(run, "swin_tiny_ft_vs_scratch").text
    ratio = (whole["swin-tiny-ft"] + 100.0) / whole["swin-tiny-scratch"]
    assert f"{ratio:.2f}x the whole trial's time" in text and "0.10x the training time per epoch" in text


def test_reanalysing_into_a_folder_drops_what_the_new_data_no_longer_supports(report, tmp_path):
    out = tmp_path / "analysis"
    shutil.copytree(report.parent, out)  # what analysing the whole study wrote
    assert (out / "swin.md").exists() and (out / "curves_swin.png").exists() and (out / "knob_effects.svg").exists()
    (out / "notes.txt").write_text("mine")  # not the analysis's: stays
    only_vits = tmp_path / "vits"
    write_run(only_vits, [trial(m, final=vit_acc(m)) for m in (VITS[0], VITS[3])])  # no knob alone
    analyse(only_vits, out)
    assert not (out / "swin.md").exists() and not (out / "curves_swin.png").exists()
    assert not (out / "knob_effects.svg").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "curves_vit.png").exists() and (out / "vit_resnet.md").exists()


def test_written_tables_and_markdown(report, run_dir):
    out = report.parent
    tables = summary_tables(load_run(run_dir))
    for name in ("vit_resnet", "swin", "seeds", "knob_effects", "recipes", "complexity", "per_trial"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), tables[name], check_dtype=False)
        md = (out / f"{name}.md").read_text()
        assert "synthetic data" in md.splitlines()[0]
    md = (out / "vit_resnet.md").read_text()
    assert "FLOPs = 2 x multiply-accumulates, attention matmuls included" in md.splitlines()[2]  # the header
    best = tables["vit_resnet"].iloc[0]
    assert f"| {best['model']} | {best['recipe']} | 1 | ok | 12 | 12 | {best['params'] / 1e6:.2f} |" in md
    assert f"{100 * best['final_test_acc']:.1f}" in md


# ------------------------------------------------------------------------------------------- plots and report
def test_every_plot_written(report):
    out = report.parent
    stems = ["acc_vs_params", "acc_vs_flops", "acc_vs_time", "curves_vit", "curves_resnet", "curves_swin",
             "knob_effects", "recipes", "tflops_vs_flops"]
    for stem in stems:
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
        svg = (out / f"{stem}.svg").read_text()
        assert "synthetic data" in svg  # in the title; SVG text is kept as text
    assert "vit-p4-e256-l8-h2-m2 (improved)" in (out / "acc_vs_flops.svg").read_text()  # a point's label
    assert "Pareto front" in (out / "acc_vs_params.svg").read_text()
    knobs = (out / "knob_effects.svg").read_text()
    # patch, dim and depth vary across completed ViTs; heads only in the diverged trial, MLP ratio never.
    assert "patch size" in knobs and "width" in knobs and "depth" in knobs
    assert "attention heads" not in knobs and "MLP ratio" not in knobs
    curves = (out / "curves_vit.svg").read_text()
    assert "(diverged)" in curves and "vit-p4-e128-l4-h2-m2 (mean of 3 seeds; band: their range)" in curves
    assert "training" in curves and "loss" in curves  # training and test, accuracy and loss
    assert "error bars: ±1 standard deviation over seeds" in (out / "acc_vs_params.svg").read_text()
    assert "3 x forward FLOPs x images/s" in (out / "tflops_vs_flops.svg").read_text()


def test_report_contents(report, run_dir):
    text = report.read_text()
    run = load_run(run_dir)
    for f in findings(run):
        assert f.text in text
    for stem in ("acc_vs_params", "acc_vs_flops", "acc_vs_time", "knob_effects", "recipes", "curves_vit"):
        assert f"]({stem}.png)" in text
    assert "synthetic data" in text.splitlines()[0]
    assert "loss is nan at epoch 3" in text and "CUDA out of memory" in text  # failed trials and their errors
    assert "12 epochs at 32 px" in text and "3 epochs at 224 px" in text and "NVIDIA H100" in text
    topics = {f.topic for f in findings(run)}
    assert {"best_vit_seed", "best_vit_improved", "knob_patch", "knob_dim", "knob_depth", "flops", "efficiency", "swin_tiny_ft_vs_scratch",
            "swin_small_vs_tiny_ft", "recipe", "seeds"} <= topics
    assert "knob_heads" not in topics and "swin_small_vs_tiny_scratch" not in topics  # no data for them


def small_run(folder: Path, vits: dict[str, float], resnet: float | None = None, swin=None) -> Path:
    trials = [trial(m, final=a, time_s=1 + parse_model_name(m).num_patches / 16) for m, a in vits.items()]
    if resnet is not None:
        trials.append(trial("resnet18-cifar", final=resnet))
    trials += [trial(m, final=a, time_s=t) for m, (a, t) in (swin or {}).items()]
    return write_run(folder, trials)


@pytest.mark.parametrize("best", ["vit-p4-e128-l4-h2-m2", "vit-p8-e256-l8-h2-m2"])
def test_best_vit_statement_follows_the_data(tmp_path, best):
    accs = {m: vit_acc(m) for m in VITS}
    accs[best] = 0.47
    run = load_run(small_run(tmp_path, accs))
    f = finding(run, "best_vit_seed")
    assert f.values["best_vit"] == best
    assert f.text.startswith(f"Best ViT (seed recipe): {best} with 47.0% final test accuracy after 12 epochs")
    assert "ResNet" not in f.text  # no ResNet in this run: no gap claimed


@pytest.mark.parametrize("resnet_acc", [0.52, 0.35, 0.40])
def test_resnet_gap_statement_follows_the_data(tmp_path, resnet_acc):
    accs = {m: vit_acc(m) for m in VITS}  # best: vit-p4-e256-l8-h2-m2 at 40%
    run = load_run(small_run(tmp_path, accs, resnet=resnet_acc))
    f = finding(run, "best_vit_seed")
    gap = 100 * (resnet_acc - max(accs.values()))
    assert f.values["gap_points"] == pytest.approx(gap)
    if gap > 0:
        assert f"ResNet-18 (resnet18-cifar, {100 * resnet_acc:.1f}%) beats it by {gap:.1f} accuracy points" in f.text
    elif gap < 0:
        assert f"It beats ResNet-18 (resnet18-cifar, {100 * resnet_acc:.1f}%) by {-gap:.1f} accuracy points" in f.text
    else:
        assert "It ties ResNet-18" in f.text
    report = write_report(run, tmp_path / "out", plots=[])
    assert f.text in report.read_text()


def test_vits_are_compared_with_resnet_from_scratch_and_pretraining_with_scratch(tmp_path):
    accs = {m: vit_acc(m) for m in VITS}  # best ViT at 40%
    trials = [trial(m, final=a) for m, a in accs.items()]
    trials += [trial("resnet18-cifar", final=0.38), trial("resnet18-imagenet-pt", final=0.60)]
    run = load_run(write_run(tmp_path, trials))
    best = finding(run, "best_vit_seed")
    assert best.values["resnet"] == "resnet18-cifar" and "It beats ResNet-18 (resnet18-cifar" in best.text
    pt = finding(run, "resnet_pretrained_seed")
    assert pt.values["delta_points"] == pytest.approx(22.0)
    at10 = {r["model"]: r["test_acc_at_10"] for _, r in run.configs.iterrows() if r["family"] == "resnet"}
    assert (f"after 10 epochs {100 * at10['resnet18-imagenet-pt']:.1f}% vs {100 * at10['resnet18-cifar']:.1f}%"
            in pt.text) and "not pretraining alone" in pt.text  # the stems differ
    # with the control from scratch at the same stem and size (the full experiment's), it compares with that
    trials += [trial("resnet18-imagenet-224", final=0.45)]
    for row, _ in trials:
        if row["model"] in ("resnet18-imagenet-pt", "resnet18-imagenet-224"):
            row["image_size"] = 224
    run = load_run(write_run(tmp_path / "control", trials))
    assert finding(run, "best_vit_seed").values["resnet"] == "resnet18-cifar"  # 32 px, as the ViTs
    pt = finding(run, "resnet_pretrained_seed")
    assert "from scratch (resnet18-imagenet-224, 224 px)" in pt.text and "not pretraining alone" not in pt.text
    assert pt.values["delta_points"] == pytest.approx(15.0)


@pytest.mark.parametrize("patch4_better", [True, False])
def test_patch_statement_follows_the_data(tmp_path, patch4_better):
    accs = {m: vit_acc(m) if patch4_better else vit_acc(m) - 0.1 * (parse_model_name(m).patch == 4) for m in VITS}
    run = load_run(small_run(tmp_path, accs))
    f = finding(run, "knob_patch")
    trials = pd.read_parquet(tmp_path / "trials.parquet").set_index("model")
    p4, p8 = ([m for m in VITS if f"-p{p}-" in m] for p in (4, 8))
    delta = 100 * (sum(accs[m] for m in p8) - sum(accs[m] for m in p4)) / 4
    flops_ratio = sum(trials.loc[a, "flops"] / trials.loc[a.replace("-p4-", "-p8-"), "flops"] for a in p4) / 4
    assert f.values["n_matched"] == 4 and f.values["delta_points"] == pytest.approx(delta)
    assert f.values["gflops_ratio"] == pytest.approx(flops_ratio)
    assert f"({delta:+.1f} points going to 8)" in f.text and ("(-" in f.text) == patch4_better
    assert "64 patches per image and patch 8 16" in f.text


def test_knob_effects_are_matched_on_a_partial_grid(tmp_path):
    # p8-e256-l8 is missing: its partner p4-e256-l8 drops out of the patch comparison, not the others'.
    accs = {m: vit_acc(m) for m in VITS if m != "vit-p8-e256-l8-h2-m2"}
    run = load_run(small_run(tmp_path, accs))
    effects = summary_tables(run)["knob_effects"].set_index(["knob", "value"])
    p4 = [m for m in accs if "-p4-" in m and m != "vit-p4-e256-l8-h2-m2"]
    assert effects.loc[("patch", 4.0), "n_matched"] == 3
    assert effects.loc[("patch", 4.0), "final_test_acc"] == pytest.approx(sum(accs[m] for m in p4) / 3)


def test_configs_that_change_several_knobs_at_once_give_no_knob_effects(tmp_path):
    # The seed experiment's four ViTs: width, heads and MLP move together, and so do patch and depth.
    seed_vits = ["vit-p8-e256-l4-h2-m2", "vit-p8-e512-l4-h4-m4", "vit-p4-e256-l8-h2-m2", "vit-p4-e512-l8-h4-m4"]
    run = load_run(small_run(tmp_path, {m: 0.3 + 0.01 * i for i, m in enumerate(seed_vits)}, resnet=0.38))
    assert summary_tables(run)["knob_effects"].empty
    assert (write_report(run, tmp_path / "out")).stat().st_size > 0


def test_swin_and_efficiency_statements_follow_the_data(tmp_path):
    swin = {"swin-tiny-ft": (0.60, 20.0), "swin-tiny-scratch": (0.12, 35.0), "swin-small-ft": (0.55, 30.0)}
    run = load_run(small_run(tmp_path / "a", {m: vit_acc(m) for m in VITS}, resnet=0.38, swin=swin))
    ft = finding(run, "swin_tiny_ft_vs_scratch")
    assert ft.values["delta_points"] == pytest.approx(48.0) and "(+48.0 points for fine-tuning)" in ft.text
    size = finding(run, "swin_small_vs_tiny_ft")
    assert size.values["delta_points"] == pytest.approx(-5.0) and "55.0% vs 60.0%" in size.text
    assert "1.50x the training time per epoch" in size.text
    eff = finding(run, "efficiency")
    trials = pd.read_parquet(tmp_path / "a" / "trials.parquet")
    trials["per_m"] = 100 * trials["final_test_acc"] / (trials["params"] / 1e6)
    assert eff.values["most_efficient"] == trials.loc[trials["per_m"].idxmax(), "model"]
    assert eff.values["least_efficient"] == trials.loc[trials["per_m"].idxmin(), "model"]

    swin["swin-small-ft"] = (0.66, 30.0)  # now Small wins
    size = finding(load_run(small_run(tmp_path / "b", {}, swin=swin)), "swin_small_vs_tiny_ft")
    assert size.values["delta_points"] == pytest.approx(6.0) and "(+6.0 points for Small)" in size.text


def test_recipe_statement(run_dir):
    f = finding(load_run(run_dir), "recipe")
    # improved - seed, in points: vit-p4-e256-l8 45 vs 40, vit-p8-e128-l4 33 vs 30, resnet 50 vs 38
    deltas = [100 * (0.45 - vit_acc("vit-p4-e256-l8-h2-m2")), 100 * (0.33 - vit_acc("vit-p8-e128-l4-h2-m2")),
              100 * (0.50 - 0.38)]
    assert f.values["n_models"] == 3 and f.values["better"] == 3
    assert f.values["mean_delta_points"] == pytest.approx(sum(deltas) / 3)


# ------------------------------------------------------------------------------------------- new statuses, families, columns
def test_a_trial_stopped_early_is_shown_but_makes_no_claim(tmp_path):
    vits = [trial(m, final=vit_acc(m)) for m in VITS]
    # The scheduler stopped this one at epoch 4, ahead of every finished ViT: no claim may rest on it.
    stopped = trial("vit-p4-e256-l8-h4-m2", final=0.55, done=4, status=STOPPED_EARLY)
    run = load_run(write_run(tmp_path / "run", [*vits, stopped]))
    tables = summary_tables(run)
    row = tables["per_trial"].set_index("trial").loc["vit-p4-e256-l8-h4-m2-seed"]
    assert row["status"] == STOPPED_EARLY and row["epochs_done"] == 4 and row["final_test_acc"] == pytest.approx(0.55)
    shown = tables["vit_resnet"].set_index("model").loc["vit-p4-e256-l8-h4-m2"]
    assert shown["status"] == STOPPED_EARLY and shown["epochs_done"] == 4
    assert list(tables["vit_resnet"]["model"])[::8] == ["vit-p4-e256-l8-h2-m2", "vit-p4-e256-l8-h4-m2"]  # below the finished
    assert STOPPED_EARLY not in FAILED and not any("vit-p4-e256-l8-h4-m2" in m for m in run.missing)
    best = finding(run, "best_vit_seed")
    assert best.values["best_vit"] == "vit-p4-e256-l8-h2-m2" and best.values["best_vit_acc"] == pytest.approx(0.40)
    assert finding(run, "knob_heads") is None  # heads 4 ran only in the stopped trial
    pd.testing.assert_frame_equal(run.knob_effects, load_run(write_run(tmp_path / "vits", vits)).knob_effects)
    assert all("vit-p4-e256-l8-h4-m2" not in f.text for f in findings(run))
    said = " ".join(caveats(run))
    assert "8 ok, 1 stopped-early" in said and "not by a failure" in said
    # Plotted beside two finished ViTs that share no knob (no knob-effects figure: the plots stay quick).
    few = load_run(write_run(tmp_path / "few", [vits[0], vits[3], stopped]))
    plots = {p.name: p for p in make_plots(few, tmp_path / "out")}
    curves = plots["curves_vit.svg"].read_text()
    assert "vit-p4-e256-l8-h4-m2-seed (stopped early)" in curves and "dash-dot: stopped early" in curves
    assert "vit-p4-e256-l8-h4-m2" not in plots["acc_vs_params.svg"].read_text()  # scatter: finished trials only


def test_a_model_family_of_its_own_beside_the_vits(tmp_path):
    vits = [trial(m, final=vit_acc(m)) for m in VITS]  # best ViT: vit-p4-e256-l8-h2-m2 at 40%
    tv = other_family("tv-convnext_tiny-pt", "torchvision", 0.62, params=28_600_000, flops=8.9e9, image_size=224,
                      pretrained=True)
    py = other_family("py-mynet", "py", 0.20, params=120_000, flops=3.1e7)
    run = load_run(write_run(tmp_path / "run", [*vits, tv, py]))
    tables = summary_tables(run)
    other = tables["other_families"].set_index("model")
    assert other.loc["tv-convnext_tiny-pt", "family"] == "torchvision" and other.loc["py-mynet", "family"] == "py"
    assert other.loc["tv-convnext_tiny-pt", "final_test_acc"] == pytest.approx(0.62)
    assert set(tables["vit_resnet"]["model"]) == set(VITS)  # neither is listed as a ViT or a ResNet
    best_tv = finding(run, "best_torchvision_seed")
    assert best_tv.text.startswith("Best torchvision model (seed recipe): tv-convnext_tiny-pt (from pretrained "
                                   "weights, 224 px) with 62.0% final test accuracy after 12 epochs")
    assert best_tv.values["best_vit"] == "vit-p4-e256-l8-h2-m2" and best_tv.values["gap_points"] == pytest.approx(22.0)
    assert "(input 224 px vs 32 px: not like for like)" in best_tv.text
    assert finding(run, "best_py_seed").values["best"] == "py-mynet"
    # More accurate than every ViT, still not "the best ViT"; the ViT-only claims and tables leave both out.
    assert finding(run, "best_vit_seed").values["best_vit"] == "vit-p4-e256-l8-h2-m2"
    for f in findings(run):
        if f.topic.startswith(("best_vit", "knob_", "flops", "resnet", "swin")):
            assert "tv-convnext" not in f.text and "py-mynet" not in f.text, f.text
    pd.testing.assert_frame_equal(run.knob_effects, load_run(write_run(tmp_path / "vits", vits)).knob_effects)
    colors = family_colors(run.families)
    assert run.families == ["vit", "py", "torchvision"]
    assert len({colors[f] for f in run.families}) == 3
    text = write_report(run, tmp_path / "out", plots=[]).read_text()
    assert best_tv.text in text and "torchvision (seed): 12 epochs at 224 px" in text
    # Plotted beside two ViTs that share no knob (no knob-effects figure: the plots stay quick).
    few = load_run(write_run(tmp_path / "few", [vits[0], vits[3], tv, py]))
    plots = {p.name: p for p in make_plots(few, tmp_path / "plots")}
    scatter = plots["acc_vs_params.svg"].read_text()
    assert "torchvision, seed recipe" in scatter and to_hex(family_colors(few.families)["torchvision"]) in scatter
    assert {"curves_vit.png", "curves_torchvision.png", "curves_py.png"} <= set(plots)


def test_flops_source_precision_and_cuda_version_are_shown(tmp_path):
    vit, res = trial(VITS[0], final=0.3), trial("resnet18-cifar", final=0.38)
    tv = other_family("tv-mobilenet_v3_small", "torchvision", 0.25, params=1_620_000, flops=1.2e7)
    for (row, rows), precision in ((vit, "bf16"), (res, "bf16"), (tv, "fp32")):
        row.update(precision="auto", cuda_version="12.8")  # the setting asked for; epoch rows: the one used
        for r in rows:
            r["precision"] = precision
    run = load_run(write_run(tmp_path / "run", [vit, res, tv]))
    complexity = summary_tables(run)["complexity"].set_index("model")
    assert complexity["flops_source"].to_dict() == {
        VITS[0]: "closed form", "resnet18-cifar": "closed form", "tv-mobilenet_v3_small": "counted"}
    assert summary_tables(run)["per_trial"].set_index("model")["precision"].to_dict() == {
        VITS[0]: "bf16", "resnet18-cifar": "bf16", "tv-mobilenet_v3_small": "fp32"}
    text = write_report(run, tmp_path / "out", plots=[]).read_text()
    assert "| tv-mobilenet_v3_small | torchvision | 32 | 1.62 | 1.62 | 0.012 | counted |" in (
        tmp_path / "out" / "complexity.md").read_text()
    assert "Precision: bf16 autocast for 2 trial(s), fp32 for 1 trial(s)" in text
    assert "CUDA 12.8" in text

    # precision and cuda_version are optional: a run without them gets no claim about them
    folder = write_run(tmp_path / "plain", [trial("resnet18-cifar", final=0.38),
                                            trial("resnet18-imagenet-pt", final=0.60)])
    plain = load_run(folder)
    assert set(summary_tables(plain)["complexity"]["flops_source"]) == {"closed form"}
    assert finding(plain, "resnet_pretrained_seed").values["delta_points"] == pytest.approx(22.0)
    assert "Precision: not recorded in this run." in caveats(plain)
    assert not any("CUDA" in c for c in caveats(plain))  # no cuda_version column: nothing claimed


def test_a_run_with_nothing_finished_yet_claims_nothing(tmp_path):
    waiting = [trial(VITS[0], done=0, status="pending"),
               other_family("py-mynet", "py", 0.2, params=120_000, flops=3.1e7)]
    waiting[1] = ({**waiting[1][0], "status": "pending"}, [])
    run = load_run(write_run(tmp_path / "run", waiting))
    assert run.configs.empty and findings(run) == [] and run.knob_effects.empty and run.recipe_pairs.empty
    text = write_report(run, tmp_path / "out").read_text()
    assert "No completed trial yet: nothing to discuss." in text and "(none: no epoch rows" in text
    assert set(summary_tables(run)["complexity"]["model"]) == {VITS[0], "py-mynet"}  # known before training


# ------------------------------------------------------------------------------------------- partial and bad runs
def test_partial_run_says_what_is_missing(tmp_path):
    running = trial("vit-p8-e128-l4-h2-m2", final=0.2, done=5, status="running")
    gap = trial("vit-p4-e128-l4-h2-m2", final=0.35)
    gap = (gap[0], [r for r in gap[1] if r["epoch"] != 7])  # ok in trials.parquet, epoch 7 never written
    lagging = trial("resnet18-cifar", final=0.38)
    lagging[0]["epochs_done"] = 11  # trials.parquet one report behind the epoch rows
    failed = trial("swin-tiny-scratch", done=1, final=0.01, status="error", error="RuntimeError: boom")
    pending = trial("vit-p8-e256-l4-h2-m2", done=0, status="pending")
    folder = write_run(tmp_path / "run", [running, gap, lagging, failed, pending])
    run = load_run(folder)
    missing = "\n".join(run.missing)
    assert "vit-p8-e128-l4-h2-m2-seed: still running in trials.parquet, 5 of 12 epochs recorded" in missing
    assert "vit-p4-e128-l4-h2-m2-seed: epoch rows missing from epochs.parquet for epoch(s) 7" in missing
    assert "swin-tiny-scratch-seed: error after 1 of 3 epochs recorded; error: RuntimeError: boom" in missing
    assert "vit-p8-e256-l4-h2-m2-seed: not started yet, 0 of 12 epochs recorded" in missing
    lag = next(m for m in run.missing if "epochs_done disagrees with the epoch rows" in m)
    assert "resnet18-cifar-seed" in lag
    table = summary_tables(run)["vit_resnet"].set_index("model")
    assert table.loc["vit-p8-e128-l4-h2-m2", "status"] == "partial"  # shown, with its 5 epochs
    assert table.loc["vit-p8-e128-l4-h2-m2", "epochs_done"] == 5
    assert math.isnan(table.loc["vit-p8-e128-l4-h2-m2", "test_acc_at_10"])
    assert table.loc["vit-p4-e128-l4-h2-m2", "status"] == "partial"  # a hole in its epochs: not complete
    best = finding(run, "best_vit_seed")
    assert best is None  # no completed ViT: no claim about the best one
    report = write_report(run, tmp_path / "out")
    text = report.read_text()
    assert "## What is missing" in text and "RuntimeError: boom" in text
    # Curves for every trial with epoch rows, failed and running included; the scatter plots hold ResNet alone.
    assert {"curves_vit.png", "curves_resnet.png", "curves_swin.png", "acc_vs_params.png"} <= {
        p.name for p in report.parent.iterdir()}


def test_run_without_epochs_file_uses_trials_summary(tmp_path):
    folder = write_run(tmp_path / "run", [trial(m, final=vit_acc(m)) for m in VITS[:2]], epochs_file=False)
    run = load_run(folder)
    assert any("epochs.parquet is missing" in m for m in run.missing)
    trials = pd.read_parquet(folder / "trials.parquet").set_index("model")
    table = summary_tables(run)["vit_resnet"].set_index("model")
    assert table.loc[VITS[0], "final_test_acc"] == trials.loc[VITS[0], "final_test_acc"]
    assert set(run.per_trial["source"]) == {"trials.parquet"}


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run folder .*nowhere does not exist.*trials\.parquet"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no trials\.parquet; expected epochs\.parquet and "):
        load_run(tmp_path / "empty")
    run = small_run(tmp_path / "results" / "r1", {VITS[0]: 0.3})
    with pytest.raises(FileNotFoundError, match="Run folders found inside it: r1"):
        load_run(run.parent)  # the results/ folder, not a run
    pd.DataFrame(columns=pd.read_parquet(run / "trials.parquet").columns).to_parquet(run / "trials.parquet")
    with pytest.raises(ValueError, match="has no rows"):
        load_run(run)
    pd.DataFrame({"trial": ["x"]}).to_parquet(run / "trials.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['model', 'family'"):
        load_run(run)


def test_a_folder_declaring_another_schema_is_refused_and_one_declaring_none_is_read_as_this_one(tmp_path, capsys):
    """docs/results.md, "Schema": the files raybench writes declare its schema; a folder written by hand (as
    write_run does: plain pandas) or by another tool declares none, with or without experiment.json."""
    import pyarrow.parquet as pq
    from raybench.analysis.__main__ import main
    from raybench.records import SCHEMA, SchemaError, write_parquet
    run = small_run(tmp_path / "run", {VITS[0]: 0.3, VITS[1]: 0.35})
    assert pq.read_schema(run / "trials.parquet").metadata.get(b"raybench.schema") is None
    assert len(load_run(run).per_trial) == 2
    (run / "experiment.json").write_text(json.dumps({"experiment": "by-hand"}))
    assert len(load_run(run).per_trial) == 2
    (run / "experiment.json").write_text(json.dumps({"schema": SCHEMA, "experiment": "by-hand"}))
    write_parquet(pd.read_parquet(run / "epochs.parquet"), run / "epochs.parquet")  # as the grid writes it
    assert pq.read_schema(run / "epochs.parquet").metadata[b"raybench.schema"] == str(SCHEMA).encode()
    assert len(load_run(run).per_trial) == 2

    (run / "experiment.json").write_text(json.dumps({"schema": 99, "experiment": "from-the-future"}))
    with pytest.raises(SchemaError, match=rf"experiment\.json declares run-folder schema 99; this raybench reads "
                                          rf"schema {SCHEMA} only"):
        load_run(run)
    (run / "experiment.json").unlink()
    table = pq.read_table(run / "trials.parquet")
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"raybench.schema": b"0"}),
                   run / "trials.parquet")
    rc, err = cli_main(capsys, main, run, "--out", tmp_path / "out")
    assert rc == 1 and "trials.parquet declares run-folder schema '0'" in err and "Traceback" not in err, err


def test_find_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYBENCH_RUN_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="no results/ folder"):
        find_run_dir(start=tmp_path)
    old, new = (small_run(tmp_path / "results" / n, {VITS[0]: 0.3}) for n in ("b-old", "a-new"))
    os.utime(old / "trials.parquet", (1e9, 1e9))
    (tmp_path / "experiments").mkdir()
    assert find_run_dir(start=tmp_path / "experiments") == new  # newest by trials.parquet, found from a subfolder
    monkeypatch.setenv("RAYBENCH_RUN_DIR", str(old))
    assert find_run_dir(start=tmp_path) == old
    assert find_run_dir("explicit", start=tmp_path) == Path("explicit")


def test_cli(tmp_path, capsys):
    # The command's wiring, on a small run: the study's numbers are the in-process tests' to check.
    run_dir = small_run(tmp_path / "run", {VITS[0]: 0.30, VITS[3]: 0.35}, resnet=0.38)
    cmd = [sys.executable, "-m", "raybench.analysis"]
    ok = subprocess.run([*cmd, str(run_dir), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / "report.md")
    assert (tmp_path / "out" / "acc_vs_params.png").stat().st_size > 0
    (tmp_path / "empty").mkdir()
    bad = subprocess.run([*cmd, str(tmp_path / "empty")], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert f"run folder {tmp_path / 'empty'} holds no trials.parquet" in bad.stderr
    (tmp_path / "a-file").write_text("")
    from raybench.analysis.__main__ import main  # the other refusals in this process (cli_main)
    for args, message in (([tmp_path / "a-file"], "is not a folder"),
                          ([run_dir, "--out", tmp_path / "a-file"], str(tmp_path / "a-file"))):
        rc, err = cli_main(capsys, main, *args)
        assert rc == 1 and message in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------- notebook
def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert not re.search(r"/(home|Users|work)/", "".join(c.source for c in nb.cells))  # no author's paths


def test_notebook_runs_top_to_bottom(run_dir, tmp_path, monkeypatch):
    execute_notebook(run_dir, tmp_path, monkeypatch)


def test_notebook_runs_on_the_results_of_a_smoke_run(smoke_run, tmp_path, monkeypatch):
    execute_notebook(smoke_run[0], tmp_path, monkeypatch)


def execute_notebook(run_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from ipykernel.kernelspec import write_kernel_spec
    # A kernelspec for this very interpreter under a private name, found first through JUPYTER_PATH: a user's
    # own "python3" spec pointing at another Python cannot take the test over, and a fresh venv needs no
    # `ipykernel install`.
    write_kernel_spec(tmp_path / "kernels" / "raybench-test")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("RAYBENCH_RUN_DIR", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="raybench-test", timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                      + str(o.get("data", {}).get("text/markdown", ""))
                      for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(run_dir) in outputs and "synthetic data" in outputs
    assert "left out of comparisons:" in outputs and "diagnosis" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
