"""The grid end to end with real Ray on this machine: packing by GPU fractions, two nodes (one of which dies),
a killed trial, a stopped driver and --resume, and bad input refused before anything starts."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_VIT, grid_main, run_grid
from raybench.experiments import load_experiment
from raybench.records import SCHEMA, parquet_schema

SMOKE = load_experiment("smoke")


def test_smoke_grid_runs_every_trial_and_epoch(smoke_run):
    run_dir, out = smoke_run
    epochs, trials = pd.read_parquet(run_dir / "epochs.parquet"), pd.read_parquet(run_dir / "trials.parquet")
    expected = {(t.name, e) for t in SMOKE.trials for e in range(1, t.recipe.epochs + 1)}
    assert set(zip(epochs.trial, epochs.epoch)) == expected and len(epochs) == len(expected)
    assert set(trials.trial) == {t.name for t in SMOKE.trials} and (trials.status == "ok").all()
    assert (epochs.device == "cpu").all() and (trials.device == "cpu").all()  # no CUDA here: recorded
    assert (epochs.threads == epochs.trial.map(trials.set_index("trial").cpus)).all()  # one thread per Ray CPU
    assert trials.synthetic.all() and (trials.gpu_fraction > 0).all()
    # final/best accuracy in trials.parquet are the epoch rows' numbers
    last = epochs.sort_values("epoch").groupby("trial").test_acc.last()
    assert trials.set_index("trial").final_test_acc.to_dict() == last.to_dict()
    assert "Ray dashboard: http://127.0.0.1:" in out
    assert "(cpu, synthetic data)" in out and "7 ok (accuracies on synthetic data)" in out  # labelled as it prints
    assert out.strip().splitlines()[-1].endswith(str(run_dir))
    assert (run_dir / "analysis" / "report.md").stat().st_size > 0
    # the folder declares the schema it is written in (docs/results.md, "Schema")
    assert json.loads((run_dir / "experiment.json").read_text())["schema"] == SCHEMA
    assert {parquet_schema(run_dir / f) for f in ("epochs.parquet", "trials.parquet")} == {str(SCHEMA)}


def test_smoke_grid_packs_trials_onto_one_logical_gpu(smoke_run):
    run_dir, _ = smoke_run
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert trials.gpu_fraction.max() <= 0.5  # at least two fit on one GPU
    spans = epochs.groupby("trial").agg(start=("started_at", "min"), end=("finished_at", "max"),
                                        gpu=("gpu_ids", "first"))
    overlapping = [(a, b) for a in spans.index for b in spans.index if a < b
                   and spans.gpu[a] == spans.gpu[b] != ""
                   and spans.start[a] < spans.end[b] and spans.start[b] < spans.end[a]]
    assert overlapping, spans


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes_and_a_node_that_dies_costs_at_most_its_epoch(tmp_path):
    """Head plus one worker node, each with one CPU: two one-CPU trials must use both. Once a trial has
    finished two epochs on the worker, the worker is removed without warning: that trial continues from its
    checkpoint on the surviving head, every epoch once. (One test, not two: a two-node start is among the
    suite's dearest, and a trial that began on the worker before it died is the proof that both nodes ran.)

    The grid runs in this process: with two raylets on one machine, a driver started in another process
    is taken for dead by the GCS (seen with Ray 2.60); on a real cluster each machine has one raylet."""
    import threading
    from ray.cluster_utils import Cluster
    from raybench.grid import main
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    epochs, moved = tmp_path / "dies" / "epochs.parquet", {}

    def remove_worker_after_its_second_epoch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not moved:
            # (read_epochs: pyarrow may open the file twice, and a replace in between fails the read: next look)
            ep = read_epochs(epochs.parent)
            epochs_on_worker = ep[ep.node_id == worker.node_id].trial.value_counts() if "node_id" in ep else {}
            # Once Tune holds the trial's epoch-1 checkpoint: Tune starts the next step only after it has
            # processed a save, so a second epoch row says so. The checkpoint's file in storage does not: a
            # node lost between the file and Tune's processing of it restarted the trial from epoch 1, whose
            # row from the head then replaced the worker's (seen in a full suite).
            saved = [t for t, n in epochs_on_worker.items() if n >= 2]
            if saved:
                moved["trial"] = saved[0]
                lose_the_worker_machine()
            time.sleep(0.2)

    def lose_the_worker_machine():
        # A machine that dies takes all its processes along. remove_node stops the node's Ray processes but not
        # the workers its raylet started ("TODO: Do we need to kill all worker processes?", ray/cluster_utils.py):
        # an orphaned trial actor trained epochs 2-4 on the removed node before it noticed.
        import psutil
        raylet = psutil.Process(worker.all_processes["raylet"][0].process.pid)
        for p in raylet.children(recursive=True):
            moved.setdefault("killed", []).append(p.pid)
            p.kill()
        cluster.remove_node(worker, allow_graceful=False)
    killer = threading.Thread(target=remove_worker_after_its_second_epoch, daemon=True)
    killer.start()
    try:
        rc = main(["--address", cluster.address, "--gpus", "0", "--only", "vit-p4", "--epochs", "4",
                   "--train-size", "1000", "--test-size", "200", "--results-dir", str(tmp_path), "--name", "dies",
                   "--no-analysis"])
    finally:
        killer.join(timeout=5)
        cluster.shutdown()
    assert rc == 0 and moved
    ep = pd.read_parquet(epochs)
    on_worker = ep[(ep.trial == moved["trial"]) & (ep.node_id == worker.node_id)]
    assert len(on_worker) and set(on_worker.pid) <= set(moved["killed"])  # its process went with the machine
    assert not ep.duplicated(["trial", "epoch"]).any()
    assert sorted(ep.groupby("trial").epoch.apply(list).tolist()) == [[1, 2, 3, 4]] * 2
    assert ep[ep.trial == moved["trial"]].node_id.nunique() == 2  # began on the worker, ended on the head
    assert ep.node_id.nunique() == 2, ep[["trial", "node_id"]]


def test_gpu_fraction_follows_compute_and_memory():
    import dataclasses
    from raybench.configs import DataSpec, Recipe, TrialSpec
    from raybench.sizing import MIN_FRACTION, activation_bytes_per_image, gpu_fraction
    small = TrialSpec(TINY_VIT, Recipe(batch_size=64), DataSpec())
    deep = TrialSpec(dataclasses.replace(TINY_VIT, depth=4), Recipe(batch_size=64), DataSpec())
    assert activation_bytes_per_image(deep.model) > 3 * activation_bytes_per_image(small.model)
    assert gpu_fraction(small) == MIN_FRACTION  # tiny: eight to a GPU
    assert gpu_fraction(small, gpu_memory_gb=1.05) == 1.0  # the 1 GB CUDA overhead alone nearly fills it
    big = TrialSpec(load_experiment("seed").trials[3].model, Recipe(batch_size=64), DataSpec())
    assert big.model.name == "vit-p4-e512-l8-h4-m4" and gpu_fraction(big) == 1.0  # 3.3 GFLOPs x 3 x 64


def test_memory_estimate_counts_data_and_cached_features_and_the_cap_leaves_room_for_cuda(tiny_swin_dir):
    import dataclasses
    from raybench.configs import DataSpec, Recipe, SwinConfig, TrialSpec
    from raybench.sizing import CUDA_OVERHEAD_BYTES, allocator_fraction, trial_memory_bytes
    vit = TrialSpec(TINY_VIT, Recipe(batch_size=64), DataSpec(train_size=1000, test_size=200))
    more = dataclasses.replace(vit, data=DataSpec(train_size=2000, test_size=200))
    assert trial_memory_bytes(more) - trial_memory_bytes(vit) == 1000 * 3 * 32 * 32  # uint8 images on the GPU
    cached = TrialSpec(SwinConfig(tiny_swin_dir, finetune=True, num_classes=10), Recipe(batch_size=32), vit.data)
    augmented = dataclasses.replace(cached, recipe=Recipe(batch_size=32, augment=("flip",)))
    # fp32 pooled features of the 2-stage tiny Swin (24 x 2 channels) for 1200 images, only when cached
    assert trial_memory_bytes(cached) - trial_memory_bytes(augmented) == 1200 * 4 * 48
    # the allocator gets the share less the CUDA context; a share too small for the real GPU fails at start
    need = trial_memory_bytes(vit)
    assert allocator_fraction(vit.name, need, 0.125, 80e9) == pytest.approx((10e9 - CUDA_OVERHEAD_BYTES) / 80e9)
    with pytest.raises(RuntimeError, match="--gpu-memory-gb 8"):
        allocator_fraction(vit.name, need, 0.125, 8e9)


def test_gpus_on_a_cluster_caps_the_trials_running_at_once():
    from raybench.sizing import max_concurrent
    res = {"a": {"gpu": 1.0}, "b": {"gpu": 0.5}, "c": {"gpu": 0.25}, "d": {"gpu": 0.125}}
    assert max_concurrent(res, None) == 0  # no cap
    assert max_concurrent(res, 1) == 1  # the largest trial alone fills one GPU
    assert max_concurrent(res, 1.5) == 2  # 1 + 0.5
    assert max_concurrent(res, 1.8) == 3  # 1 + 0.5 + 0.25
    assert max_concurrent(res, 2) == 4  # all four: 1.875
    assert max_concurrent({"a": {"gpu": 0.0}}, 2) == 0  # CPU trials are not capped by GPUs


def write_experiment(path: Path, models: list, epochs: int, train_size: int) -> Path:
    path.write_text(json.dumps({  # JSON is YAML
        "name": path.stem, "dataset": {"name": "synthetic", "train_size": train_size, "test_size": 200},
        "num_classes": 10, "epochs": epochs, "models": models}))
    return path


def wait_for(cond, timeout=180, every=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met")


def read_epochs(run_dir: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(run_dir / "epochs.parquet")
    except (FileNotFoundError, OSError):
        return pd.DataFrame(columns=["trial", "epoch", "pid"])


@pytest.mark.slow
def test_a_killed_trial_retries_from_its_checkpoint_and_a_stopped_driver_resumes_without_repeating_trials(tmp_path):
    """Both ways a run loses a process, and the signals that stop a driver, in one run (one Ray start fewer than
    a run each). Two CPUs, two per trial: one trial at a time, in grid order. Once the first trial has finished,
    the second one's process is killed with SIGKILL in its second epoch: Tune retries it from its epoch-1
    checkpoint in a new process. As soon as the retry has reported an epoch, the driver gets SIGTERM, as a batch
    scheduler sends at a time limit: it stops the way Ctrl+C does, saying what it kept and how to continue; a
    SIGHUP (a closed terminal) half a second later, while Tune stops, ends it at once, keeping what was written
    and leaving no process behind. The results folder is moved (as when copying it to another disk) and the run
    resumed to its end."""
    import psutil
    exp = write_experiment(tmp_path / "stop.yaml", ["vit-p8-e32-l1-h2-m2", "vit-p4-e64-l2-h2-m2"],
                           epochs=4, train_size=800)
    first_trial, second_trial = "vit-p8-e32-l1-h2-m2-seed", "vit-p4-e64-l2-h2-m2-seed"
    run_dir = tmp_path / "res" / "stop"
    args = [sys.executable, "-m", "raybench.grid", "--experiment", str(exp), "--gpus", "0", "--cpus", "2",
            "--cpus-per-trial", "2", "--results-dir", str(tmp_path / "res"), "--name", "stop", "--no-analysis",
            "--no-dashboard"]

    def second_rows():
        e = read_epochs(run_dir)
        return e[e.trial == second_trial]

    def second_pid():
        rows = second_rows()
        return int(rows.pid.iloc[0]) if len(rows) else None
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        killed = wait_for(second_pid)
        time.sleep(0.5)  # into epoch 2
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: (second_rows().pid != killed).any())  # the retry's first epoch
        ray_processes = psutil.Process(proc.pid).children(recursive=True)  # its local Ray, the trials, the reaper
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # while Tune stops
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    before = read_epochs(run_dir)
    first, second = (before[before.trial == t] for t in (first_trial, second_trial))
    assert sorted(first.epoch) == [1, 2, 3, 4] and second.epoch.max() < 4, out[-3000:]
    assert not second.epoch.duplicated().any() and second.pid.nunique() == 2 and killed in set(second.pid)
    assert "retrying from its last checkpoint" in out
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"[grid] stopped by SIGTERM: 1/2 trials ended, {len(before)} epochs kept in {run_dir}")
    assert last.endswith(f"--results-dir {tmp_path / 'res'} --name stop --resume")
    assert "SIGTERM: stopping the run; finished epochs are kept" in out, out[-3000:]
    assert "Traceback" not in out.split("SIGTERM: stopping the run")[1]  # (the SIGKILLed trial's is logged above)
    _, alive = psutil.wait_procs(ray_processes, timeout=15)
    assert not alive, [p.cmdline() for p in alive]

    (tmp_path / "res").rename(tmp_path / "moved")
    run_dir = tmp_path / "moved" / "stop"
    args[args.index(str(tmp_path / "res"))] = str(tmp_path / "moved")
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = read_epochs(run_dir)
    done_first = lambda e: e[e.trial == first_trial].sort_values("epoch")
    # the finished trial was not run again: its rows are the very same reports
    assert done_first(after)[["epoch", "pid", "finished_at"]].values.tolist() == \
        done_first(before)[["epoch", "pid", "finished_at"]].values.tolist()
    second = after[after.trial == second_trial]
    assert sorted(second.epoch) == [1, 2, 3, 4]  # each epoch exactly once
    assert (after.threads == 2).all()  # --cpus-per-trial 2: in the first process, the retry and the resumed run
    assert (pd.read_parquet(run_dir / "trials.parquet").status == "ok").all()
    assert not (tmp_path / "res").exists()  # nothing written where the run folder used to be


@pytest.mark.parametrize("content, message", [
    ({"models": ["vit-p4-e256"]}, r"models\[0\].*vit-p4-e256"),
    ({"models": [{"family": "vit", "patch": 5}]}, r"models\[0\].*patch=5"),
    ({"models": [{"name": "resnet18-cifar", "resouces": {"gpu": 1}}]}, r"models\[0\].*resouces"),
    ({"modles": ["resnet18-cifar"]}, r"modles"),
    ({"models": ["resnet18-cifar"], "recipe": {"lr": -1}}, r"bad.yaml: top-level recipe: Recipe.lr=-1"),
    ({"models": ["resnet18-cifar"], "epochs": -3}, r"bad.yaml: top level: epochs=-3: must be a whole number >= 1"),
    ({"models": [{"name": "resnet18-cifar", "epochs": 0}]},
     r"models\[0\] \(resnet18-cifar\): epochs=0: must be a whole number >= 1"),
    ({"models": ["resnet18-cifar"], "num_classes": "ten"}, r"num_classes='ten'"),
    ({"models": ["resnet18-cifar"], "dataset": 5}, r"dataset=5"),
    ({"models": [{"grid": [1, 2]}]}, r"models\[0\].*grid=\[1, 2\]"),
    ({"models": [{"name": "vit-p8-e32-l1-h2-m2", "patch": 5}]}, r"models\[0\].*patch=5"),
])
def test_invalid_experiment_files_are_refused_before_ray_starts(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(content))
    t0 = time.time()
    rc, err = grid_main(capsys, "--experiment", path, "--results-dir", tmp_path / "res")
    assert rc == 2 and str(path) in err and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "res").exists()
    assert time.time() - t0 < 30
    if "models" not in message:  # a mistake outside the models list is not blamed on one of them
        assert "models[" not in err, err


def test_refusals_reach_the_shell_as_exit_status_2_and_one_error_line(tmp_path):
    """The refusals above, as a user's shell sees them: from `python -m raybench.grid` in its own process."""
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"models": [{"family": "vit", "patch": 5}]}))
    for args in (["--experiment", path], ["--gpus", "-1"]):
        r = run_grid(*args, "--results-dir", tmp_path / "res", timeout=60)
        assert r.returncode == 2 and r.stderr.count("error: ") == 1, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "res").exists()


@pytest.mark.parametrize("args, message", [
    (["--gpus", "-1"], "--gpus=-1: must be >= 0"),
    (["--epochs", "0"], "--epochs=0: must be >= 1"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial=0: must be > 0"),
    (["--max-failures", "-1"], "--max-failures=-1: must be >= 0"),
    (["--grow-min-epoch-s", "-1"], "--grow-min-epoch-s=-1: must be >= 0"),
    (["--gpus", "inf"], "--gpus=inf: must be a finite number"),
    (["--grow-min-epoch-s", "nan"], "--grow-min-epoch-s=nan: must be a finite number"),
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb=0: must be > 0"),
    (["--gpus", "0.5"], "--gpus=0.5: a local Ray gets whole GPUs"),
    (["--cpus", "1", "--cpus-per-trial", "2", "--gpus", "0"], "asks for 2 CPU and 0 GPU, but the nodes offer 1 CPU"),
    # a trial that asks no GPU is not told to use --gpus 0 (test_the_cpu_hint_names_what_the_trial_asks_for)
    (["--cpus", "1", "--cpus-per-trial", "2", "--gpus", "0"], "lower --cpus-per-trial (or the experiment's "
                                                              "resources.cpu) to at most 1"),
    (["--experiment", "nope"], "built-in: full, seed, seed-custom, smoke"),
    (["--only", "zzz"], "--only='zzz' matches no trial"),
    (["--seeds", "two"], "--seeds='two'"),
    (["--seeds", "0,3,0"], "--seeds='0,3,0': seed 0 appears twice"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--resume", "--name", "never-ran"], "--resume: no run"),
    (["--experiment", "seed", "--data-dir", "/nonexistent/cifar"], "CIFAR-100 is not in /nonexistent/cifar"),
    (["--experiment", "seed", "--dataset", "synthetic"], "swin-tiny-ft: Swin weights"),
    (["--scheduler", "hyperband"], "invalid choice: 'hyperband'"),
    (["--scheduler", "asha", "--asha-grace-epochs", "0"], "--asha-grace-epochs=0: must be >= 1"),
    (["--scheduler", "asha", "--asha-grace-epochs", "2"],
     "--asha-grace-epochs=2: must be below the longest trial's epochs (2)"),
])
def test_invalid_cli_values_are_refused_before_ray_starts(tmp_path, capsys, args, message):
    rc, err = grid_main(capsys, *args, "--results-dir", tmp_path / "res")
    assert rc == 2 and message in err, err
    assert not (tmp_path / "res").exists()


def test_the_cpu_hint_names_what_the_trial_asks_for(tmp_path, capsys):
    """--cpus-per-trial 100 on a machine without CUDA: the trial asks for no GPU, so the hint is about CPUs."""
    rc, err = grid_main(capsys, "--cpus-per-trial", "100", "--results-dir", tmp_path / "res")
    assert rc == 2 and "asks for 100 CPU and 0 GPU" in err and "--gpus 0" not in err, err
    assert f"lower --cpus-per-trial (or the experiment's resources.cpu) to at most {os.cpu_count()}" in err


def test_missing_data_is_reported_before_the_trials_are_sized(tmp_path, capsys, monkeypatch):
    """The README's full study without CIFAR-100 on disk: sizing its 76 trials' GPU shares builds every model
    (a minute and more), so the data is checked first and sizing never starts."""
    import raybench.plan

    def sized(*a, **kw):
        raise AssertionError("a trial was sized before the data was checked")
    monkeypatch.setattr(raybench.plan.rr, "trial_memory_bytes", sized)
    rc, err = grid_main(capsys, "--experiment", "full", "--gpus", "4", "--data-dir", tmp_path / "data",
                        "--results-dir", tmp_path / "res")
    assert rc == 2 and f"CIFAR-100 is not in {tmp_path / 'data'}" in err and "Traceback" not in err, err
    assert not (tmp_path / "res").exists()


def test_mlflow_missing_is_refused_before_ray_starts_with_the_install_command(tmp_path, capsys, monkeypatch):
    # Python skips a module whose sys.modules entry is None: `import mlflow` fails as where it is not installed.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    rc, err = grid_main(capsys, "--mlflow", "--results-dir", tmp_path / "res")
    assert rc == 2 and "pip install 'raybench[mlflow]'" in err, err
    assert "Traceback" not in err and not (tmp_path / "res").exists()


def test_unusable_results_folders_and_run_records_are_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    rc, err = grid_main(capsys, "--results-dir", tmp_path / "a-file" / "res")
    assert rc == 2 and "is not a folder this user can write to" in err, err
    damaged = tmp_path / "res" / "smoke-1"
    damaged.mkdir(parents=True)
    (damaged / "experiment.json").write_text("{")  # a run folder whose driver died while writing it
    rc, err = grid_main(capsys, "--resume", "--results-dir", tmp_path / "res", "--name", "smoke-1")
    assert rc == 2 and f"{damaged / 'experiment.json'}: cannot be read" in err, err
    assert "Traceback" not in err
    (damaged / "experiment.json").write_text(json.dumps({"schema": 99, "experiment": "smoke", "settings": {}}))
    rc, err = grid_main(capsys, "--resume", "--results-dir", tmp_path / "res", "--name", "smoke-1")
    assert rc == 2 and f"declares run-folder schema 99; this raybench reads schema {SCHEMA} only" in err, err


@pytest.mark.parametrize("checkpoint, message", [
    ("/nonexistent/swin", "looks like a folder, but there is no folder there"),
    ("microsoft/swin-base-patch4-window7-224", "are not in the Hugging Face cache"),  # tests run offline
])
def test_unreadable_swin_checkpoints_are_refused_while_sizing_gpu_shares(tmp_path, capsys, checkpoint, message):
    # With GPUs the resource rule needs the architecture, read from the checkpoint's config.json.
    exp = write_experiment(tmp_path / "swin.yaml", [{"name": "swin-tiny-ft", "checkpoint": checkpoint}], 1, 64)
    rc, err = grid_main(capsys, "--experiment", exp, "--gpus", 1, "--results-dir", tmp_path / "res")
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_asha_stops_a_hopeless_one_and_mlflow_has_every_trial_and_epoch(tmp_path):
    """Two ways a trial goes wrong, in one run (one Ray start fewer than a run each). lr 3 (AdamW) leaves a ViT
    at chance (~10% on 10 classes) while lr 1e-3 reaches ~30% in one epoch: one CPU runs the trials one after
    another in grid order, so the good trial reaches ASHA's rung (epoch 1) first and the hopeless one is
    measured against it there. lr 1e12 makes the third one's loss non-finite: it is recorded as diverged and
    the others go on."""
    pytest.importorskip("mlflow", reason="the test extra installs mlflow (pip install 'raybench[mlflow]')")
    from mlflow.tracking import MlflowClient
    good, bad, wild = "vit-p8-e32-l1-h2-m2", "vit-p8-e32-l2-h2-m2", "vit-p8-e64-l1-h2-m2"
    exp = write_experiment(tmp_path / "asha.yaml", [good, {"name": bad, "recipe": {"lr": 3.0}},
                                                    {"name": wild, "recipe": {"lr": 1e12}}],
                           epochs=3, train_size=1000)
    # a relative --storage-path is taken from the working folder, as a user typing it expects
    r = run_grid("--experiment", exp, "--gpus", 0, "--cpus", 1, "--scheduler", "asha", "--asha-grace-epochs", 1,
                 "--mlflow", "--no-dashboard", "--results-dir", tmp_path / "res", "--name", "asha",
                 "--storage-path", "tune-state", cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # a diverged trial is a failure
    assert (tmp_path / "tune-state" / "asha").is_dir()
    run_dir = tmp_path / "res" / "asha"
    trials = pd.read_parquet(run_dir / "trials.parquet").set_index("trial")
    assert trials.status.to_dict() == {f"{good}-seed": "ok", f"{bad}-seed": "stopped-early",
                                       f"{wild}-seed": "diverged"}
    assert "non-finite training loss" in trials.error[f"{wild}-seed"] and "DIVERGED" in r.stdout
    assert trials.epochs_done.to_dict() == {f"{good}-seed": 3, f"{bad}-seed": 1, f"{wild}-seed": 1}
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert sorted(zip(epochs.trial, epochs.epoch)) == [(f"{good}-seed", 1), (f"{good}-seed", 2),
                                                      (f"{good}-seed", 3), (f"{bad}-seed", 1), (f"{wild}-seed", 1)]
    assert f"{bad}-seed: stopped early by the scheduler after 1/3 epochs" in r.stdout
    counts = re.search(r"\[grid\] 3 trials: (.*) \(accuracies", r.stdout).group(1)
    assert sorted(counts.split(", ")) == ["1 diverged", "1 ok", "1 stopped-early"], counts
    # the analysis keeps it in the per-trial table and says why it is not in the findings
    report = (run_dir / "analysis" / "report.md").read_text()
    assert "1 stopped-early trial(s) were ended by the scheduler (ASHA)" in report
    per_trial = pd.read_parquet(run_dir / "analysis" / "per_trial.parquet").set_index("trial")
    assert per_trial.status[f"{bad}-seed"] == "stopped-early"
    settings = json.loads((run_dir / "experiment.json").read_text())["settings"]
    assert (settings["scheduler"], settings["asha_grace_epochs"], settings["mlflow"]) == ("asha", 1, "run-folder")

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in r.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("asha")
    runs = {run.data.tags["raybench_trial"]: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(trials.index)
    for name, run in runs.items():
        assert run.data.tags["status"] == trials.status[name]
        assert run.data.tags["model_family"] == "vit" and run.data.tags["data"] == "synthetic"
        assert float(run.data.params["trial/spec/recipe/lr"]) == trials.lr[name]
        history = client.get_metric_history(run.info.run_id, "test_acc")
        mine = epochs[epochs.trial == name].sort_values("epoch")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            list(zip(mine.epoch, mine.test_acc))

    # --resume keeps the scheduler's decision and the divergence: neither trial is trained on, and with every
    # trial ended there is nothing to start Ray for
    again = run_grid("--experiment", exp, "--results-dir", tmp_path / "res", "--name", "asha", "--resume",
                     "--no-analysis", cwd=tmp_path)
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert "every trial of the run has ended: nothing to train" in again.stdout
    assert "Started a local Ray instance" not in again.stdout + again.stderr
    after = pd.read_parquet(run_dir / "trials.parquet").set_index("trial")
    assert after.status.to_dict() == trials.status.to_dict()
    assert after.epochs_done.to_dict() == trials.epochs_done.to_dict()
    assert pd.read_parquet(run_dir / "epochs.parquet").equals(epochs)
