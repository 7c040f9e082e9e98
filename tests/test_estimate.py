"""The estimate: Ray's packing of trial fractions simulated against hand-computed makespans, the calibration
cache (hit, miss, --recalibrate, a damaged file), the time left from measured epochs, and the price flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pandas as pd
import pytest

from raybench import estimate as E
from raybench.configs import DataSpec, Recipe, TrialSpec

from conftest import TINY_VIT


# --- packing: each makespan below is worked out by hand in the comment above it -------------------------

def test_four_half_shares_on_one_gpu_run_two_at_a_time():
    # 0.5 + 0.5 fill the GPU: two pairs of 10 s one after the other
    jobs = [(f"t{i}", 1, 0.5, 10.0) for i in range(4)]
    s = E.simulate(jobs, [E.Node(cpus=8, gpus=1)])
    assert E.makespan(s) == 20.0
    assert s["t0"] == s["t1"] == (0.0, 10.0) and s["t2"] == s["t3"] == (10.0, 20.0)


def test_start_order_decides_the_makespan():
    # one GPU; a whole-GPU job of 10 s and two half-GPU jobs of 5 s each.
    # whole first: 0-10 alone, then both halves together 10-15 -> 15
    big, small = ("big", 1, 1.0, 10.0), [("a", 1, 0.5, 5.0), ("b", 1, 0.5, 5.0)]
    assert E.makespan(E.simulate([big, *small], [E.Node(4, 1)])) == 15.0
    # halves first: together 0-5, then the whole GPU 5-15 -> also 15, but with a 20 s half job it differs:
    # [half 20, half 5, whole 10]: 0-20 and 0-5 on the GPU, whole waits for a free GPU until 20 -> 30
    # [whole 10, half 20, half 5]: whole 0-10, then halves 10-30 and 10-15 -> 30; longest first:
    # [half 20, whole 10, half 5]: half 0-20, whole cannot fit, half 5 fits 0-5, whole at 20-30 -> 30
    jobs = [("h20", 1, 0.5, 20.0), ("h5", 1, 0.5, 5.0), ("w10", 1, 1.0, 10.0)]
    assert E.makespan(E.simulate(jobs, [E.Node(4, 1)])) == 30.0
    # with two GPUs: h20 on GPU0 0-20, h5 on GPU0 0-5, w10 on GPU1 0-10 -> 20
    assert E.makespan(E.simulate(jobs, [E.Node(4, 2)])) == 20.0


def test_fractions_sit_on_one_gpu_each():
    # two GPUs, shares 0.75, 0.75, 0.5, 0.5 of 10 s each: the 0.75s take a GPU each and leave 0.25 on both,
    # so neither 0.5 fits although 0.5 GPU is free in sum; they run 10-20 together on one GPU -> 20
    jobs = [("a", 1, 0.75, 10.0), ("b", 1, 0.75, 10.0), ("c", 1, 0.5, 10.0), ("d", 1, 0.5, 10.0)]
    s = E.simulate(jobs, [E.Node(8, 2)])
    assert E.makespan(s) == 20.0
    assert s["c"][0] == s["d"][0] == 10.0


def test_a_job_that_does_not_fit_does_not_hold_back_later_ones():
    # 1 GPU: a 0.75 share runs 0-10; the next 0.5 waits, the 0.25 after it starts at once (0-4) -> 0.5 at 10-20
    jobs = [("a", 1, 0.75, 10.0), ("b", 1, 0.5, 10.0), ("c", 1, 0.25, 4.0)]
    s = E.simulate(jobs, [E.Node(8, 1)])
    assert s["c"] == (0.0, 4.0) and s["b"] == (10.0, 20.0) and E.makespan(s) == 20.0


def test_cpu_only_packing():
    # 2 CPUs, one each: A 4 s and B 3 s start at 0; C (2 s) takes B's CPU at 3 and ends at 5 -> 5
    jobs = [("A", 1, 0, 4.0), ("B", 1, 0, 3.0), ("C", 1, 0, 2.0)]
    s = E.simulate(jobs, [E.Node(2)])
    assert s["C"] == (3.0, 5.0) and E.makespan(s) == 5.0
    # the same in the worse order (shortest first): C 0-2, B 0-3, A at 2-6 -> 6: longest first pays
    assert E.makespan(E.simulate(list(reversed(jobs)), [E.Node(2)])) == 6.0
    # half-CPU jobs: four fit on 2 CPUs at once -> the longest, 4
    assert E.makespan(E.simulate([(n, 0.5, 0, d) for n, _, _, d in jobs] + [("D", 0.5, 0, 1.0)],
                                 [E.Node(2)])) == 4.0


def test_several_nodes_and_a_concurrency_cap():
    # two nodes of 1 CPU/1 GPU; three whole-GPU jobs of 6 s: two at 0-6, the third 6-12 -> 12
    jobs = [(f"g{i}", 1, 1.0, 6.0) for i in range(3)]
    assert E.makespan(E.simulate(jobs, [E.Node(1, 1), E.Node(1, 1)])) == 12.0
    # a 2-GPU job needs two free GPUs on one node: 2-GPU node takes it (0-5), the 1-GPU node the rest
    jobs = [("two", 1, 2.0, 5.0), ("one", 1, 1.0, 3.0)]
    s = E.simulate(jobs, [E.Node(1, 1), E.Node(4, 2)])
    assert s["two"] == (0.0, 5.0) and s["one"] == (0.0, 3.0)
    # max_concurrent 1 on a node that could run all four half-CPU jobs: one after another, 4 x 2 s -> 8
    jobs = [(f"c{i}", 0.5, 0, 2.0) for i in range(4)]
    assert E.makespan(E.simulate(jobs, [E.Node(2)], max_concurrent=1)) == 8.0


def test_a_job_no_node_can_hold_is_an_error_naming_it():
    with pytest.raises(ValueError, match="big: asks for 1 CPU and 2 GPU"):
        E.simulate([("big", 1, 2.0, 1.0)], [E.Node(8, 1)])


def test_study_orders_longest_first_and_sums_device_hours():
    est = [E.TrialEstimate("short", 2, 100.0, 0.0, 1, 0.5, "measured"),
           E.TrialEstimate("long", 2, 900.0, 0.0, 1, 0.5, "measured"),
           E.TrialEstimate("done", 0, 50.0, 0.0, 1, 0.5, "measured")]
    s = E.study(est, [E.Node(2, 1)], gpu_hour_price=2.0, cpu_hour_price=0.1)
    assert s.order() == ["long", "short"]  # finished trials are not estimated
    long_wall, short_wall = 1800 + E.TRIAL_START_S, 200 + E.TRIAL_START_S
    assert s.wall_s == pytest.approx(long_wall)  # both halves at once
    assert s.gpu_hours == pytest.approx(0.5 * (long_wall + short_wall) / 3600)
    assert s.cost == pytest.approx(2.0 * s.gpu_hours + 0.1 * s.cpu_hours)
    assert E.StudyEstimate.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# --- prices ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["-1", "abc", "nan", "inf", ""])
def test_price_refuses_what_is_not_a_price(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a price per device-hour, a number >= 0"):
        E.price(text)
    assert E.price("2.5") == 2.5 and E.price("0") == 0.0


def test_node_type_prices_come_from_labels():
    cfg = {"available_node_types": {
        "gpu": {"resources": {"GPU": 1}, "node_config": {}, "labels": {E.PRICE_LABEL: "3.06"}},
        "cpu": {"resources": {"CPU": 8}, "node_config": {}}}}
    assert E.node_type_prices(cfg) == {"gpu": 3.06}
    cfg["available_node_types"]["cpu"]["labels"] = {E.PRICE_LABEL: "-2"}
    with pytest.raises(ValueError, match="node type cpu"):
        E.node_type_prices(cfg)


def test_the_shipped_cluster_file_prices_are_read_and_pass_rays_validation():
    from raybench.cluster import validate_cluster_config
    prices = E.node_type_prices(validate_cluster_config("cluster.yaml"))
    assert prices and all(p > 0 for p in prices.values())


# --- calibration cache ----------------------------------------------------------------------------------

def _spec(batch=32, **kw):
    return TrialSpec(TINY_VIT, Recipe(epochs=3, batch_size=batch),
                     DataSpec("synthetic", train_size=256, test_size=64), seed=0, **kw)


def test_calibration_cache_hit_miss_recalibrate_and_damage(tmp_path, capsys):
    path = tmp_path / "cal.json"
    a, b = _spec(), dataclasses.replace(_spec(batch=64), seed=1)
    lines = []
    t1 = E.timings([a], {a.name: "cpu"}, {a.name: 1}, path=path, log=lines.append)
    assert len(lines) == 1 and "calibrating" in lines[0] and path.exists()  # miss: measured, written
    assert t1[a.name].step_s > 0 and t1[a.name].source.startswith("measured on cpu")
    lines.clear()
    assert E.timings([a], {a.name: "cpu"}, {a.name: 1}, path=path, log=lines.append) == t1 and not lines  # hit
    # another batch is another entry; a second trial of the same model shares one calibration
    same_model = dataclasses.replace(a, seed=5)
    t2 = E.timings([a, b, same_model], {n.name: "cpu" for n in (a, b, same_model)},
                   {n.name: 1 for n in (a, b, same_model)}, path=path, log=lines.append)
    assert len(lines) == 1 and "batch 64" in lines[0] and t2[same_model.name] == t1[a.name]
    lines.clear()
    E.timings([a], {a.name: "cpu"}, {a.name: 1}, path=path, recalibrate=True, log=lines.append)
    assert len(lines) == 1  # --recalibrate measures again
    path.write_text("{ not json")
    capsys.readouterr()
    t3 = E.timings([a], {a.name: "cpu"}, {a.name: 1}, path=path, log=lines.append)
    assert t3[a.name].step_s > 0 and json.loads(path.read_text())  # rebuilt
    assert f"warning: calibration cache {path} cannot be read" in capsys.readouterr().err


def test_a_device_not_reachable_is_assumed_from_flops_and_says_so(tmp_path):
    a = _spec()
    t = E.timings([a], {a.name: "assumed-cuda"}, {a.name: 1}, path=tmp_path / "none.json")
    assert t[a.name].source == E.ASSUMPTION and t[a.name].step_s > 0
    assert not (tmp_path / "none.json").exists()  # nothing measured, nothing cached
    est = E.study([E.trial_estimate(a, t[a.name], {"cpu": 1, "gpu": 0.5})], [])
    assert any("ASSUMED" in line for line in est.lines())


def test_trial_estimate_counts_steps_evaluation_and_one_offs():
    t = E.Timing(step_s=0.1, eval_batch_s=0.5, feature_s_per_image=0.0, compile_s=7.0, source="measured on x")
    s = _spec()  # 256 training images at batch 32: 8 steps; 64 test images: a quarter of an eval batch
    e = E.trial_estimate(s, t, {"cpu": 1, "gpu": 0}, epochs_done=1)
    assert e.epoch_s == pytest.approx(8 * 0.1 + 64 / 256 * 0.5) and e.epochs == 2 and e.once_s == 7.0
    assert e.time_s == pytest.approx(7.0 + 2 * e.epoch_s)


# --- progress -------------------------------------------------------------------------------------------

def test_eta_follows_the_measured_epochs():
    trials = [E.TrialEstimate("a", 4, 10.0, 0.0, 1, 0, "m"), E.TrialEstimate("b", 4, 10.0, 0.0, 1, 0, "m")]
    est = E.study(trials, [E.Node(1)]).to_dict()
    est["trial_start_s"] = 0.0
    # a ran 1 epoch at twice the predicted pace (20 s): 3 left at 20 s = 60 s; b, not started, is predicted
    # at 10 s x the measured ratio 2 = 80 s, after a on the one CPU -> the study has 140 s left
    ep = pd.DataFrame({"trial": ["a"], "epoch": [1], "train_time_s": [18.0], "eval_time_s": [2.0],
                       "status": ["running"]})
    left, study_left = E.eta(est, ep, running={"a"}, now=1000.0)
    assert left == {"a": 60.0, "b": 80.0} and study_left == 140.0
    ep.loc[0, "status"] = "ok"  # a ended: nothing left of it
    left, study_left = E.eta(est, ep, running=set(), now=0.0)
    assert left["a"] == 0.0 and study_left == 80.0


def test_a_long_epoch_prints_its_step_count_at_a_steady_pace(capsys):
    from raybench.train import Trial
    trial = Trial(_spec(), device="cpu", threads=1)  # 256 images at batch 32: 8 steps an epoch
    trial.progress_every_s = 0.0  # every step is "long": a line each
    trial.train_epoch()
    lines = [l for l in capsys.readouterr().out.splitlines() if "step" in l]
    assert [l.split("step ")[1].split(",")[0] for l in lines] == [f"{i}/8" for i in range(1, 9)]
    assert lines[0].startswith(f"[{trial.spec.name}] epoch 1/3: step 1/8") and "left in the epoch" in lines[0]
    trial.progress_every_s = 3600.0  # the default pace: a short epoch says nothing until its record
    trial.train_epoch()
    assert "step" not in capsys.readouterr().out


def test_the_grid_prints_the_estimate_first_and_an_eta_on_every_epoch_line(smoke_run):
    """The smoke run's output goes to a pipe (not a terminal): plain lines, one per epoch, each with its ETAs;
    the prediction stands beside the measured time in trials.parquet and estimate.json."""
    run_dir, out = smoke_run
    lines = out.splitlines()
    first_epoch = next(i for i, l in enumerate(lines) if " epoch " in l and "test acc" in l)
    study_line = next(i for i, l in enumerate(lines) if l.startswith("[estimate] study:"))
    assert study_line < first_epoch and "predicted wall time" in lines[study_line]
    epoch_lines = [l for l in lines if re.match(r"\[grid\] \S+ +epoch +\d+/\d+  test acc", l)]
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(epoch_lines) == trials.epochs_done.sum()  # one line per epoch
    assert all("ETA trial " in l and ", study " in l for l in epoch_lines), epoch_lines
    # the last epoch of the run leaves nothing: its study ETA is 0s
    assert epoch_lines[-1].endswith("study 0s"), epoch_lines[-1]
    assert (trials.predicted_time_s > 0).all() and (trials.total_time_s > 0).all()
    est = E.read(run_dir)
    assert est["actual_wall_s"] > 0 and est["wall_s"] > 0
    # a local run times every model on this machine, the frozen-backbone fine-tune and its feature pass too
    assert all(t["source"].startswith("measured on cpu") for t in est["trials"]), est["trials"]
    assert [t["once_s"] > 0 for t in est["trials"] if t["name"].startswith("swin-micro-ft")] == [True]
    assert [t["name"] for t in est["trials"]] == sorted([t["name"] for t in est["trials"]],
                                                         key=lambda n: -trials.set_index("trial").predicted_time_s[n])
    assert any(l.startswith("[grid] wall time of the trials: predicted") for l in lines)
    summary = [l for l in lines if "final test acc" in l]
    assert len(summary) == len(trials) and all("(predicted " in l for l in summary), summary


@pytest.mark.parametrize("flag", ["--gpu-hour-price", "--cpu-hour-price"])
@pytest.mark.parametrize("value", ["-0.5", "two"])
def test_price_flags_are_refused_before_ray_starts(flag, value, capsys, tmp_path):
    from conftest import grid_main
    rc, err = grid_main(capsys, flag, value, "--results-dir", tmp_path / "res")
    assert rc == 2 and f"argument {flag}: '{value}': expected a price per device-hour, a number >= 0" in err
    assert not (tmp_path / "res").exists()  # nothing was planned, let alone started


def test_a_resumed_run_estimates_only_what_is_left(tmp_path):
    # three trials of 3 epochs each (names differ by the ViT's patch side)
    a, b, c = (dataclasses.replace(_spec(), model=dataclasses.replace(TINY_VIT, patch=p)) for p in (8, 16, 32))
    pd.DataFrame({"trial": [a.name] * 2 + [b.name] * 3, "epoch": [1, 2, 1, 2, 3]}).to_parquet(
        tmp_path / "epochs.parquet")
    pd.DataFrame({"trial": [a.name, b.name, c.name], "status": ["running", "ok", "pending"]}).to_parquet(
        tmp_path / "trials.parquet")
    res = {s.name: {"cpu": 1, "gpu": 0} for s in (a, b, c)}
    est = E.for_run([a, b, c], res, [E.Node(2)], cluster=False, run_dir=tmp_path)
    left = {t.name: t.epochs for t in est.trials}
    assert left == {a.name: 1, c.name: 3}  # b finished; a has one epoch of three left
    assert any("resumed" in n for n in est.notes)
    fresh = E.for_run([a, b, c], res, [E.Node(2)], cluster=False)
    assert sum(t.epochs for t in fresh.trials) == 9 and fresh.cpu_hours > est.cpu_hours


def test_epoch_lines_are_plain_off_a_terminal_and_a_live_view_on_one(tmp_path, capsys):
    est = E.study([E.TrialEstimate("a", 2, 10.0, 0.0, 1, 0, "m"), E.TrialEstimate("b", 2, 10.0, 0.0, 1, 0, "m")],
                  [E.Node(2)]).to_dict()
    ep = pd.DataFrame({"trial": ["a"], "epoch": [1], "train_time_s": [10.0], "eval_time_s": [0.0],
                       "status": ["running"]})
    E.show_epoch("[grid] a epoch 1/2", tmp_path, "a", 1, 2, est, ep, {"a", "b"}, ended=False, tty=False)
    assert capsys.readouterr().out.splitlines() == [f"[grid] a epoch 1/2  ETA trial 10s, study {E.fmt_s(23.0)}"]
    # on a terminal: the line, then the study's bar and the trial's, each with its ETA
    E.show_epoch("[grid] a epoch 1/2", tmp_path, "a", 1, 2, est, ep, {"a", "b"}, ended=False, tty=True)
    out = capsys.readouterr().out
    assert "[grid] a epoch 1/2\n" in out and "study" in out and "1/4, ETA 23s" in out and "1/2, ETA 10s" in out
    ep = pd.DataFrame({"trial": ["a", "a", "b", "b"], "epoch": [1, 2, 1, 2], "train_time_s": [10.0] * 4,
                       "eval_time_s": [0.0] * 4, "status": ["running", "ok", "running", "ok"]})
    E.show_epoch("[grid] b epoch 2/2", tmp_path, "b", 2, 2, est, ep, set(), ended=True, tty=True)
    assert "[grid] b epoch 2/2" in capsys.readouterr().out and not E._views  # the study ended: view closed


def test_the_report_sets_prediction_beside_reality(tmp_path):
    from types import SimpleNamespace
    from raybench.analysis.prediction import prediction_section
    trials = pd.DataFrame({"trial": ["a", "b", "c"], "predicted_time_s": [60.0, 30.0, float("nan")],
                           "total_time_s": [50.0, 60.0, 10.0]})
    E.write(E.study([], []), tmp_path)
    E.record_actual(tmp_path, 120.0)
    text = "\n".join(prediction_section(SimpleNamespace(trials=trials, path=tmp_path)))
    assert "| a | 1m00s | 50s | 1.20 |" in text and "| b | 30s | 1m00s | 0.50 |" in text and "| c |" not in text
    assert "furthest off: b" in text and "actual 2m00s (prediction -100%)" in text
    # a run from before the estimate: no section
    assert prediction_section(SimpleNamespace(trials=trials.drop(columns="predicted_time_s"), path=tmp_path)) == []


def test_prices_from_the_labels_of_a_clusters_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0}, "Labels": {E.PRICE_LABEL: "0.4"}},
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}, "Labels": {E.PRICE_LABEL: "6.0"}},
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}, "Labels": {E.PRICE_LABEL: "1.2"}},
             {"Alive": True, "Resources": {"CPU": 2.0}}]  # no label: says nothing
    assert E.prices_from_nodes(nodes) == (1.5, 0.05)  # 6.0 / 4 GPUs beats 1.2 / 1; 0.4 / 8 CPUs
    assert E.prices_from_nodes(nodes[3:]) == (None, None)


# --- CPUs freed by finished trials ----------------------------------------------------------------------

def test_extra_cpus_only_when_free_nothing_waits_and_the_epochs_are_long():
    from raybench.rescale import extra_cpus
    assert extra_cpus(3.0, 1.0, 4.0, epochs_left=5, epoch_s=60, waiting=0, min_epoch_s=20) == 3
    assert extra_cpus(1.5, 1.0, 4.0, 5, 60, 0, 20) == 1  # whole CPUs: threads
    assert extra_cpus(8.0, 1.0, 4.0, 5, 60, 0, 20) == 3  # no more than the node has
    assert extra_cpus(3.0, 1.0, 4.0, 5, 60, waiting=1, min_epoch_s=20) == 0  # a waiting trial needs them
    assert extra_cpus(3.0, 1.0, 4.0, 0, 60, 0, 20) == 0  # nothing left to run
    assert extra_cpus(3.0, 1.0, 4.0, 5, 5, 0, 20) == 0  # a restart costs more than short epochs gain


@pytest.mark.slow
def test_a_cpu_trial_takes_the_cpus_a_finished_trial_freed(tmp_path):
    """Two CPU trials on 2 CPUs: a one-epoch ViT ends first, and a four-epoch one goes on with both CPUs (two
    torch threads) from its next epoch, resumed from its checkpoint with every epoch once."""
    from conftest import run_grid
    exp = tmp_path / "grow.yaml"
    exp.write_text("name: grow\ndataset: {name: synthetic, train_size: 600, test_size: 100}\nnum_classes: 10\n"
                   "recipes: [seed]\nseeds: [0]\nepochs: 4\n"
                   "models:\n  - {name: vit-p8-e32-l1-h2-m2, epochs: 1}\n  - vit-p4-e32-l2-h2-m2\n")
    r = run_grid("--experiment", exp, "--gpus", 0, "--cpus", 2, "--results-dir", tmp_path, "--name", "grow",
                 "--no-analysis", "--no-dashboard", "--grow-min-epoch-s", 0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ep = pd.read_parquet(tmp_path / "grow" / "epochs.parquet")
    assert not ep.duplicated(["trial", "epoch"]).any()
    long = ep[ep.trial.str.startswith("vit-p4")].sort_values("epoch")
    assert long.epoch.tolist() == [1, 2, 3, 4], ep[["trial", "epoch", "threads"]]
    assert long.threads.iloc[0] == 1 and long.threads.iloc[-1] == 2, ep[["trial", "epoch", "threads"]]
    assert "goes on with 2 CPUs" in r.stdout
    settings = json.loads((tmp_path / "grow" / "experiment.json").read_text())["settings"]
    assert settings["grow_min_epoch_s"] == 0  # --resume goes on with it


def test_an_image_folders_splits_are_counted_by_suffix(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            (tmp_path / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            (tmp_path / split / f"c{i % 2}" / f"{i}.png").write_bytes(b"")
    (tmp_path / "train" / "c0" / "notes.txt").write_text("not an image")
    spec = dataclasses.replace(_spec(), data=DataSpec("imagefolder", str(tmp_path)))
    assert E.split_sizes(spec) == (3, 2)
