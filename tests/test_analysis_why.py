"""The report explains the run: diagnoses in the tables, findings that say why, trials that learnt nothing left
out of comparisons, what each time measured, and what the run trained on. Run folders written as in
test_analysis (the documented schema), with curves shaped like the cases the study met."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raybench.analysis import caveats, findings, load_run, make_plots, summary_tables, write_report
from test_analysis import VITS, finding, other_family, small_run, trial, vit_acc, write_run


def curves(t, test, train=None, train_loss=None, test_loss=None, classes=None, test_images=None, **cols):
    """Trial `t` (row, epoch rows) with its epoch rows' curves replaced; one value per epoch."""
    row, rows = t
    for i, r in enumerate(rows):
        r["test_acc"] = test[i]
        for name, v in (("train_acc", train), ("train_loss", train_loss), ("test_loss", test_loss)):
            if v is not None:
                r[name] = v[i]
        if classes:
            r["num_classes"] = classes
        if test_images:
            r["test_images"], r["train_images"] = test_images, 5 * test_images
        r.update(cols)
    row["final_test_acc"], row["best_test_acc"] = test[-1], max(test)
    return row, rows


def real(t, folder="/data/fashion-mnist"):
    t[0].update(dataset="imagefolder", synthetic=False, data_dir=folder)
    return t


# ----------------------------------------------------------------------------------------- not a result
def test_trials_that_learn_nothing_are_named_and_never_ranked(tmp_path):
    n = 12
    # ResNet-18 at lr 1000: finite but huge losses, 10% on 10 classes, status ok.
    resnet = real(curves(trial("resnet18-imagenet-pt", final=0.1), [0.10] * n, [0.10] * n,
                         [1e5 / (e + 1) for e in range(n)], [3e4] * n, classes=10, test_images=1000))
    vit = real(curves(trial(VITS[0], final=0.37), list(np.linspace(0.2, 0.37, n)), list(np.linspace(0.2, 0.39, n)),
                      list(np.linspace(2.2, 1.7, n)), list(np.linspace(2.2, 1.75, n)), classes=10, test_images=1000))
    # mobilenet on real images: fits its training set (82%), tests at chance, test loss at ln 10.
    mob = real(other_family("tv-mobilenet_v3_small", "torchvision", 0.096, params=1_620_000, flops=1.2e7))
    mob = curves(mob, [0.096] * n, list(np.linspace(0.5, 0.82, n)), list(np.linspace(1.4, 0.5, n)),
                 [math.log(10)] * n, classes=10, test_images=1000)
    run = load_run(write_run(tmp_path / "run", [resnet, vit, mob]))
    diag = run.per_trial.set_index("trial")["diagnosis"]
    assert diag["resnet18-imagenet-pt-seed"] == "diverged,not learning"
    assert diag["tv-mobilenet_v3_small-seed"] == "not learning"
    ex = finding(run, "excluded")
    assert set(ex.values["trials"]) == {"resnet18-imagenet-pt-seed", "tv-mobilenet_v3_small-seed"}
    assert "final test accuracy 9.6%, chance 10.0% with 10 classes" in ex.text
    best = finding(run, "best_vit_seed")
    assert "ResNet" not in best.text and "resnet" not in best.values  # no gap to a model that learnt nothing
    assert finding(run, "best_torchvision_seed") is None  # "Best torchvision model ... -62.1 points": gone
    for f in findings(run):
        if f.topic != "excluded":
            assert "mobilenet" not in f.text and "resnet18-imagenet-pt" not in f.text, f.text
    table = summary_tables(run)["vit_resnet"]
    assert list(table["model"]) == [VITS[0], "resnet18-imagenet-pt"]  # shown, below, with its diagnosis
    assert table.set_index("model").loc["resnet18-imagenet-pt", "diagnosis"] == "diverged,not learning"
    plots = {p.name: p for p in make_plots(run, tmp_path / "plots")}
    assert "mobilenet" not in plots["acc_vs_params.svg"].read_text()
    assert "[not learning]" in plots["curves_torchvision.svg"].read_text()
    # the same trials without the class count: chance unknown, so "not learning" is not claimed, and says so
    for _, rows in (resnet, vit, mob):
        for r in rows:
            del r["num_classes"]
    run = load_run(write_run(tmp_path / "unknown", [resnet, vit, mob]))
    assert "not learning" not in run.per_trial.set_index("trial").loc["tv-mobilenet_v3_small-seed", "diagnosis"]
    assert "classes not recorded" in caveats(run)[0]


# ----------------------------------------------------------------------------------------- why
def seed_study(tmp_path, overfit_from=13, n=30):
    """The seed study's shape on CIFAR-100: ViTs that do not fit their training set (5-12%) and swing; larger
    ones fit worse; ResNet-18 fits (93%) and overfits after test loss bottoms out."""
    rng = np.random.default_rng(0)
    out = []
    for model, level in (("vit-p8-e256-l4-h2-m2", 0.12), ("vit-p4-e256-l8-h2-m2", 0.11),
                         ("vit-p8-e512-l4-h4-m4", 0.07), ("vit-p4-e512-l8-h4-m4", 0.06)):
        test = [level * (1 - 0.5 ** (e + 1)) + (0.03 if e % 4 == 1 else 0.0) for e in range(n)]
        out.append(curves(trial(model, final=level, epochs=n), test, [a + 0.005 for a in test],
                          [4.6 - 0.3 * a for a in test], [4.6 - 0.2 * a for a in test], classes=100,
                          test_images=10_000))
    test = [min(0.50, 0.1 + 0.04 * e) - (0.004 * (e - overfit_from) if e > overfit_from else 0) for e in range(n)]
    loss = [2.0 + abs(e + 1 - overfit_from) * 0.05 + rng.uniform(0, 0.001) for e in range(n)]
    out.append(curves(trial("resnet18-cifar", final=test[-1], epochs=n), test,
                      [min(0.93, 0.1 + 0.05 * e) for e in range(n)], [3.0 - 0.09 * e for e in range(n)], loss,
                      classes=100, test_images=10_000))
    return load_run(write_run(tmp_path, out))


def test_findings_say_why(tmp_path):
    run = seed_study(tmp_path / "run")
    diag = run.per_trial.set_index("model")["diagnosis"]
    assert diag["resnet18-cifar"] == "overfitting"  # past its peak: neither converged nor still improving
    assert all(diag[m].startswith("underfitting,unstable") for m in diag.index if m.startswith("vit"))
    res = run.per_trial.set_index("model").loc["resnet18-cifar"]
    assert res["test_loss_min_epoch"] == 13 and res["generalization_gap"] == pytest.approx(0.93 - res["final_test_acc"])
    over = finding(run, "overfit_resnet_seed")
    drop = 100 * (res["best_test_acc"] - res["final_test_acc"])
    assert over.values["from_epoch"] == 13 and over.values["drop_points"] == pytest.approx(drop)
    assert (f"resnet18-cifar-seed overfits from epoch 13" in over.text
            and f"is {drop:.1f} points above its final one" in over.text)
    under = finding(run, "underfit_vit_seed")
    assert under.text.startswith("4 of 4 ViT trial(s) (seed recipe) underfit") and "not over-fitting" in under.text
    size = finding(run, "size_fit_vit_seed")
    assert size.values["kind"] == "optimisation" and "also fit their training data worse" in size.text
    assert "The gap is optimisation, not over-fitting." in size.text
    unstable = finding(run, "unstable_vit_seed")
    assert "ViT trials under the seed recipe are unstable (4 of 4)" in unstable.text
    # the same study with ResNet-18 stopping at its test-loss minimum: no over-fitting claimed
    calm = seed_study(tmp_path / "calm", overfit_from=40)
    assert finding(calm, "overfit_resnet_seed") is None
    assert "overfitting" not in calm.per_trial.set_index("model").loc["resnet18-cifar", "diagnosis"]


def test_the_recipe_comparison_in_the_terms_of_the_diagnosis(tmp_path):
    n = 8
    test = [0.05, 0.08, 0.10, 0.07, 0.10, 0.075, 0.10, 0.07]  # swings of 2.5-3 points, no trend
    seed = curves(trial(VITS[0], final=0.07, epochs=n), test, [a + 0.01 for a in test], classes=100)
    improved = curves(trial(VITS[0], "improved", final=0.4, epochs=n), list(np.linspace(0.1, 0.4, n)),
                      list(np.linspace(0.1, 0.7, n)), classes=100)
    f = finding(load_run(write_run(tmp_path, [seed, improved])), "recipe_diagnosis")
    assert (f"{VITS[0]}: seed underfitting,unstable (training 8.0%, test 7.0%) -> improved still improving "
            "(training 70.0%, test 40.0%)") in f.text


def test_confounded_knobs_are_named_with_the_experiment_that_isolates_them(tmp_path):
    seed_vits = ["vit-p8-e256-l4-h2-m2", "vit-p8-e512-l4-h4-m4", "vit-p4-e256-l8-h2-m2", "vit-p4-e512-l8-h4-m4"]
    run = load_run(small_run(tmp_path / "seed", {m: 0.3 + 0.01 * i for i, m in enumerate(seed_vits)}))
    f = finding(run, "knob_confounded")
    assert "patch size and depth change together (between vit-p8-e256-l4-h2-m2 and vit-p4-e256-l8-h2-m2" in f.text
    assert "width, heads and MLP ratio change together" in f.text and "`full` experiment" in f.text
    full = load_run(small_run(tmp_path / "grid", {m: vit_acc(m) for m in VITS}))
    assert finding(full, "knob_confounded") is None  # every knob isolated


# ----------------------------------------------------------------------------------------- time
def test_which_times_were_measured_while_sharing_and_the_throughput_they_reached(tmp_path):
    trials = [trial(m, final=vit_acc(m), time_s=t) for m, t in ((VITS[0], 2.0), (VITS[7], 8.0))]
    trials.append(trial("resnet18-cifar", final=0.38, time_s=3.0))
    clock = {VITS[0]: 0.0, VITS[7]: 1.0, "resnet18-cifar": 0.0}
    gpu = {VITS[0]: "0", VITS[7]: "0", "resnet18-cifar": "1"}  # the ViTs share GPU 0; ResNet-18 has GPU 1
    for row, rows in trials:
        for r in rows:
            start = clock[row["model"]] + 10 * (r["epoch"] - 1)
            r.update(started_at=start, finished_at=start + 5, gpu_ids=gpu[row["model"]], device=row["device"])
    run = load_run(write_run(tmp_path / "run", trials))
    shared = run.per_trial.set_index("model")["shared_epochs"]
    assert shared.to_dict() == {VITS[0]: 12, VITS[7]: 12, "resnet18-cifar": 0}
    f = finding(run, "sharing")
    assert f.values["shared_trials"] == [f"{VITS[0]}-seed", f"{VITS[7]}-seed"] and "(12 of 12 epochs)" in f.text
    assert "overstates what the model costs alone" in f.text and "resnet18-cifar-seed" in f.text
    assert "2 of 3 trials shared their device" in " ".join(caveats(run))
    tflops = run.per_trial.set_index("model")["train_tflops"]
    row = run.trials.set_index("model").loc[VITS[7]]
    ips = pd.DataFrame(trials[1][1])["images_per_s"].mean()
    assert tflops[VITS[7]] == pytest.approx(3 * row["flops"] * ips / 1e12)
    size = finding(run, "throughput_size_NVIDIA H100 80GB HBM3")
    assert size.values["smallest"] == VITS[0] and size.values["largest"] == "resnet18-cifar"
    assert "the usual forward+backward estimate" in size.text
    written = write_report(run, tmp_path / "out", plots=[])
    per_trial = pd.read_parquet(written.parent / "per_trial.parquet")
    assert {"diagnosis", "best_epoch", "test_loss_min_epoch", "generalization_gap", "train_tflops", "tflops_share",
            "shared_epochs"} <= set(per_trial.columns)
    assert "epochs shared" in (written.parent / "throughput.md").read_text()
    from raybench.analysis.plots import SCATTERS, _scatter, family_colors
    stem, col, label, log = SCATTERS[2]  # accuracy vs time: the shared times say so on their points
    fig = _scatter(run, run.complete, col, label, log, family_colors(run.families))
    shown = [t.get_text() for t in fig.axes[0].texts]
    assert f"{VITS[7]} (shared)" in shown and "resnet18-cifar" in shown
    # a run folder without start/end times (written by hand): nothing claimed about sharing, and it says so
    assert finding(load_run(small_run(tmp_path / "hand", {VITS[0]: 0.3})), "sharing") is None
    assert "Whether trials shared a device is not known" in " ".join(caveats(load_run(tmp_path / "hand")))


# ----------------------------------------------------------------------------------------- what it ran on
def test_the_report_says_what_it_ran_on_and_caveats_only_what_applies(tmp_path):
    same = [real(curves(trial(m, final=0.8, epochs=3), [0.6, 0.7, 0.8], [0.6, 0.72, 0.83], classes=10,
                        test_images=1000)) for m in (VITS[0], "resnet18-cifar")]
    run = load_run(write_run(tmp_path / "real", same))
    said = caveats(run)
    assert said[0] == ("Data: image folder fashion-mnist, folder /data/fashion-mnist, 10 classes, 5,000 training "
                       "images, 1,000 test images, input 32 px.")
    assert not any("not a like-for-like" in c for c in said) and any("same budget and input size" in c for c in said)
    report = write_report(run, tmp_path / "out")
    outputs = [report, *report.parent.glob("*.md"), *report.parent.glob("*.svg")]
    assert not any("synthetic" in p.read_text().lower() for p in outputs)
    synthetic = load_run(small_run(tmp_path / "syn", {VITS[0]: 0.3}, swin={"swin-tiny-ft": (0.6, 20.0)}))
    said = caveats(synthetic)
    assert said[0].startswith("Data: synthetic data") and any("not a like-for-like" in c for c in said)


# ----------------------------------------------------------------------------------------- thin input
def test_thin_and_bad_input_still_gives_a_report_and_no_diagnosis_it_cannot_support(tmp_path):
    one = curves(trial(VITS[0], final=0.2, epochs=1), [0.2], classes=100)
    nan = curves(trial(VITS[1], final=0.3), list(np.linspace(0.1, 0.3, 12)), train_loss=[math.nan] * 12,
                 test_loss=[math.nan] * 12, classes=100)
    diverged = trial(VITS[2], final=0.05, done=2, status="diverged", error="non-finite training loss (nan)")
    for r in diverged[1]:
        r["train_loss"] = math.nan
    empty = trial(VITS[3], done=0, status="error", error="RuntimeError: boom")
    run = load_run(write_run(tmp_path / "run", [one, nan, diverged, empty]))
    diag = run.per_trial.set_index("model")["diagnosis"]
    assert diag[VITS[0]] == "too few epochs to judge" and diag[VITS[3]] == "too few epochs to judge"
    assert diag[VITS[2]] == "diverged"
    assert "diverged" not in diag[VITS[1]] and "overfitting" not in diag[VITS[1]]
    report = write_report(run, tmp_path / "out")
    text = report.read_text()
    assert "too few epochs to judge" in (report.parent / "per_trial.md").read_text()
    assert f"{VITS[2]}-seed (diverged" in text  # named as left out


def test_curve_axes_do_not_magnify_noise(tmp_path):
    from raybench.analysis.plots import _acc_limits, _curves
    assert _acc_limits(np.array([5.0, 40.0]))[:2] == (0.0, pytest.approx(43.0))  # from 0
    assert _acc_limits(np.array([10.0, 10.5]))[0] == 0.0  # flat at chance: a zoom would magnify noise
    bottom, top, note = _acc_limits(np.array([88.0, 96.0]))  # fills an eighth of 0-96: zoomed, and says so
    assert 80 < bottom < 88 and top > 96 and note == f" (zoomed: axis starts at {bottom:.0f}%, not 0)"
    run = load_run(small_run(tmp_path, {VITS[0]: 0.3}))
    ax = _curves(run, "vit").axes[0]
    ax.figure.canvas.draw()
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown and all(float(t).is_integer() for t in shown)


# ----------------------------------------------------------------------------------------- the docs keep up
def test_every_threshold_and_every_finding_is_in_docs_analysis(tmp_path, request):
    import re
    from pathlib import Path

    from raybench.analysis import diagnose, findings as findings_module, plots, usage
    doc = (Path(request.config.rootpath) / "docs" / "analysis.md").read_text()
    for module in (diagnose, usage, findings_module, plots):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert name in doc, f"{module.__name__}.{name} is not explained in docs/analysis.md"
    table = doc[doc.index("## The discussion: every finding and when it fires"):]
    documented = [re.compile(re.sub(r"<[^>]+>", ".+", t).replace("*", ".*"))
                  for row in table.splitlines() if row.startswith("| `")
                  for t in re.findall(r"`([^`]+)`", row.split("|")[1])]
    runs = [seed_study(tmp_path / "seed"), load_run(small_run(tmp_path / "grid", {m: vit_acc(m) for m in VITS},
                                                             resnet=0.38, swin={"swin-tiny-ft": (0.6, 20.0)}))]
    for f in (f for run in runs for f in findings(run)):
        assert any(p.fullmatch(f.topic) for p in documented), f"finding {f.topic} is not listed in docs/analysis.md"


def test_a_folder_written_by_hand_with_the_required_columns_only_gets_the_new_columns(tmp_path):
    from raybench.analysis.load import EPOCH_COLUMNS, TRIAL_COLUMNS
    folder = small_run(tmp_path / "run", {VITS[0]: 0.3, VITS[7]: 0.4})
    trials = pd.read_parquet(folder / "trials.parquet")[list(TRIAL_COLUMNS)].assign(dataset="fashion-mnist")
    trials.to_parquet(folder / "trials.parquet")  # no `synthetic` flag: the dataset's name decides
    pd.read_parquet(folder / "epochs.parquet")[list(EPOCH_COLUMNS)].to_parquet(folder / "epochs.parquet")
    run = load_run(folder)
    assert run.label == "fashion-mnist"
    pt = run.per_trial.set_index("model")
    assert pt.loc[VITS[7], "diagnosis"] == "converged" and pt.loc[VITS[7], "best_epoch"] == 12
    assert pt[["train_tflops", "shared_epochs", "generalization_gap"]].isna().all().all()  # not in the data
    said = " ".join(caveats(run))
    assert "classes not recorded" in said and "Whether trials shared a device is not known" in said
    report = write_report(run, tmp_path / "out", plots=[])
    assert "synthetic" not in report.read_text().lower()
    assert {"diagnosis", "train_tflops", "shared_epochs"} <= set(pd.read_parquet(report.parent / "per_trial.parquet"))
