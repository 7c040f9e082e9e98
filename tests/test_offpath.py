"""The paths next to the smoke run, with the real thing each time: a Ray head started by `ray start` in its own
temp dir (token auth on, as Ray 2.60 starts it), a driver killed with SIGKILL, an image folder on disk, a
trial out of GPU memory. (A stale address file is test_bench.py's, beside actor reuse.)"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_VIT, free_port, run_grid
from injected_faults import oom_env
from test_grid import read_epochs, write_experiment

TINY = ["--only", "vit-p8-e32-l1", "--train-size", "200", "--test-size", "100", "--no-analysis"]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def gpuless_head(tmp_path_factory):
    """`ray start --head --num-gpus=0`, no autoscaler, one CPU, on 127.0.0.1 in a temp dir of its own (so its
    address file is not the default one other Rays on this machine read). Yields HOST:PORT."""
    import tempfile
    from raybench.cluster import stop_local_cluster
    temp = tempfile.mkdtemp(prefix="rbh-", dir="/tmp")  # short: Ray's socket paths under it must fit in 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    r = subprocess.run([ray_bin(), "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                        f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        # its GCS, raylet and monitor outwait SIGTERM by seconds; nothing of this head is kept, so SIGKILL soon
        stop_local_cluster(str(temp), grace_s=1)
        import shutil
        shutil.rmtree(temp, ignore_errors=True)


def test_joins_a_token_protected_head_by_host_port(gpuless_head, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    r = run_grid("--address", gpuless_head, "--gpus", "0", "--epochs", "1", *TINY, "--results-dir", tmp_path,
                 "--name", "joined", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "InvalidAuthToken" not in r.stdout + r.stderr
    # the estimate: from FLOPs before joining (the driver cannot see the workers' devices), then timed by a Ray
    # task with the trial's resources on the cluster (raybench.estimate.on_cluster)
    before, after = r.stdout.split("[estimate] calibrating 1 trial(s) on the cluster with 1 CPU / 0 GPU")
    assert "ASSUMED" in before and "measured on cpu" in after and "ASSUMED" not in after
    assert len(pd.read_parquet(tmp_path / "joined" / "epochs.parquet")) == 1
    # (RAY_ADDRESS, as `ray job submit` sets it, joins the same way: the pending-trials test below joins so)


def test_a_rejected_token_ends_in_one_error_line_within_30s(gpuless_head, tmp_path):
    env = {**os.environ, "RAY_AUTH_TOKEN": "0" * 64}
    t0 = time.monotonic()
    r = run_grid("--address", gpuless_head, "--gpus", "0", *TINY, "--results-dir", tmp_path, "--name", "refused",
                 env=env)
    took = time.monotonic() - t0
    assert r.returncode == 2 and took < 30, (took, r.stderr)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and gpuless_head in errors[0] and "RAY_AUTH_TOKEN" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "InvalidAuthToken" not in r.stderr
    assert not (tmp_path / "refused").exists()  # the same --name works next time


def test_an_unreachable_cluster_ends_in_one_error_line(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = run_grid("--address", dead, "--gpus", "0", *TINY, "--results-dir", tmp_path, "--name", "nowhere")
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --address {dead}: no Ray cluster answers")
    assert "Traceback" not in r.stderr and not (tmp_path / "nowhere").exists()


def test_a_trial_no_node_can_hold_is_refused_before_fit(gpuless_head, tmp_path):
    r = run_grid("--address", gpuless_head, "--gpus", "2", *TINY, "--results-dir", tmp_path, "--name", "nogpu")
    assert r.returncode == 2, r.stdout[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert "vit-p8-e32-l1-h2-m2-seed asks for 1 CPU and 0.125 GPU" in err and "1 CPU and 0 GPU" in err, err
    assert "no autoscaler" in err and "Traceback" not in r.stderr and not (tmp_path / "nogpu").exists()


def test_pending_trials_stop_the_run_after_the_timeout_with_the_resume_command(gpuless_head, tmp_path):
    """The head's only CPU is held by another job's actor: the trial fits the node but never gets it.
    --pending-timeout stops the run the way Ctrl+C does; the trial stays pending, resumable. The run joins the
    head through RAY_ADDRESS, as `ray job submit` sets it, without --address, and says so."""
    hog = tmp_path / "hog.py"  # a job whose actor holds the CPU until the job ends (at its stdin's end)
    hog.write_text("import ray, sys\nray.init(address=%r)\n"
                   "@ray.remote(num_cpus=1)\nclass Hog:\n    def ping(self): return 1\n"
                   "h = Hog.remote()\nray.get(h.ping.remote())\nprint('held', flush=True)\nsys.stdin.read()\n"
                   % gpuless_head)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    log = tmp_path / "hog.stderr"  # a file, not a pipe: Ray's lines cannot fill it and block the job
    with open(log, "w") as err, subprocess.Popen([sys.executable, str(hog)], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=err, text=True, env=env) as job:
        try:
            ready, _, _ = select.select([job.stdout], [], [], 120)  # a job that hangs fails the test, not the suite
            held = job.stdout.readline() if ready else "(nothing in 120 s)"
            assert held == "held\n", held + log.read_text()[-2000:]
            r = run_grid("--gpus", "0", *TINY, "--pending-timeout", "0.05", "--results-dir", tmp_path, "--name",
                         "waits", env={"RAY_ADDRESS": gpuless_head}, timeout=300)
        finally:
            job.stdin.close()  # the job ends, and its actor with it
            try:
                job.wait(timeout=60)
            finally:
                job.kill()
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"RAY_ADDRESS={gpuless_head} is set" in r.stdout
    assert "waited 0.05 min for resources" in r.stdout and "--name waits --resume" in r.stdout
    trials = pd.read_parquet(tmp_path / "waits" / "trials.parquet")
    assert trials.status.tolist() == ["pending"]


def session_processes(session_dir: str) -> list[str]:
    import psutil
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if any(session_dir in a for a in cmd) and "raybench.session" not in cmd:
                found.append(f"{p.pid} {' '.join(cmd)[:120]}")
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_resume_after_kill_9_uses_the_local_ray_the_run_started_with_and_requeues_trials_out_of_memory(tmp_path):
    """README: `python -m raybench.grid --experiment EXPERIMENT --name k1 --resume`, after a `--gpus 2` run whose
    driver was killed with SIGKILL mid-epoch. Nothing of the killed driver's Ray session is left running, and
    the resumed run gets its 2 (logical) GPUs back: enough for a trial that needs a whole one.

    A driver killed mid-write may leave its files cut short: here Tune's experiment_state-*.json, epochs.parquet
    and trials.parquet are each cut to half their bytes before the resume. `--resume` sets them aside (renamed,
    not deleted), rebuilds the epoch rows from Tune's result files and the trial rows from experiment.json and
    those, and continues each trial from its newest checkpoint.

    In the resumed run (one local Ray start fewer than a run of its own) injected faults make one trial
    run out of GPU memory in epoch 4 until its share reaches 0.25, and the other at any share: the first resumes
    from its epoch-3 checkpoint at 0.25 and finishes; the second, given a whole GPU by the experiment file, has
    no larger share to climb to, so its OOM is final. Every (trial, epoch) lands exactly once."""
    import psutil
    from raybench.recover import newest_checkpoint_epoch, tune_records
    # Two ViTs of one size (their epochs take as long): the driver is killed once both have an epoch logged, and
    # a smaller one could have finished its four by then (it did once, on a slow host)
    a, b = "vit-p8-e32-l2-h2-m2-seed", "vit-p8-e32-l2-h4-m2-seed"
    exp = write_experiment(tmp_path / "k1.yaml", ["vit-p8-e32-l2-h2-m2", {"name": "vit-p8-e32-l2-h4-m2",
                                                                         "resources": {"gpu": 1}}],
                           epochs=4, train_size=1000)
    args = [sys.executable, "-m", "raybench.grid", "--experiment", str(exp), "--name", "k1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args + ["--gpus", "2", "--no-analysis", "--no-dashboard"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "results" / "k1"
    epochs = run_dir / "epochs.parquet"
    deadline = time.monotonic() + 300

    def tune_logged() -> bool:
        """Tune's result files, as the resume reads them, hold an epoch of each trial and every epoch it has a
        checkpoint of (Tune writes them after raybench's callback has written the row, and copies them into
        the run folder after the checkpoint)."""
        logged = tune_records(run_dir / "ray").groupby("trial").epoch.max()
        return all(logged.get(t, 0) >= max(1, newest_checkpoint_epoch(run_dir / "ray" / t)) for t in (a, b))

    # An epoch of each in epochs.parquet and in Tune's result files, which the resume rebuilds it from. Tune's
    # files in the run folder are copies of its staging folder's, each rewritten whole again and again by a
    # thread of the driver: a kill in the middle of a copy leaves it cut, and the resume would then train that
    # trial again from epoch 1 (tests/test_recover.py). So the driver is frozen, a checkpoint it asked for
    # before given a second to land, and the driver killed once the files the resume reads are as needed.
    while True:
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        if read_epochs(run_dir).trial.nunique() == 2 and tune_logged():
            first.send_signal(signal.SIGSTOP)
            time.sleep(1)
            if tune_logged():
                break
            first.send_signal(signal.SIGCONT)
        time.sleep(0.5)
    reapers = [p for p in psutil.process_iter(["cmdline"])
               if "raybench.session" in (p.info["cmdline"] or []) and str(first.pid) in p.info["cmdline"]]
    assert len(reapers) == 1
    session_dir = reapers[0].info["cmdline"][-1]
    assert session_processes(session_dir)
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 30
    while session_processes(session_dir) and time.monotonic() < deadline:
        time.sleep(1)
    assert not session_processes(session_dir), session_processes(session_dir)
    before = read_epochs(run_dir)

    (state,) = (run_dir / "ray").glob("experiment_state-*.json")
    for path in (state, epochs, run_dir / "trials.parquet"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = subprocess.run(args + ["--resume"], cwd=tmp_path, env=oom_env(f"{a}:4:0.25;{b}:4:2", env),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # b ended out of memory
    said = "\n".join(l for l in r.stdout.splitlines() if l.startswith("[grid] recovered: "))
    assert re.search(r"epochs.parquet could not be read .* epoch row\(s\) of 2 trial\(s\)", said), said
    assert "trials.parquet could not be read" in said and "Tune's state of the run cannot be read" in said, said
    assert "0 trial(s) have ended and are kept; 2 go on from their newest checkpoint" in r.stdout
    for name in (state.name, "epochs.parquet", "trials.parquet"):  # set aside, not deleted
        assert len(list(state.parent.glob(f"{name}.damaged-*")) + list(run_dir.glob(f"{name}.damaged-*"))) == 1
    trials = pd.read_parquet(tmp_path / "results" / "k1" / "trials.parquet").set_index("trial")
    assert trials.loc[a, "status"] == "ok" and trials.loc[a, "gpu_shares"] == "0.125,0.25"
    assert trials.loc[a, "gpu_fraction"] == 0.25
    assert trials.loc[b, "status"] == "oom" and trials.loc[b, "gpu_shares"] == "1"
    ep = pd.read_parquet(epochs)
    assert not ep.duplicated(["trial", "epoch"]).any()
    assert sorted(ep[ep.trial == a].epoch) == [1, 2, 3, 4] and sorted(ep[ep.trial == b].epoch) == [1, 2, 3]
    assert ep[ep.trial == a].sort_values("epoch").gpu_share.tolist() == [0.125] * 3 + [0.25]  # epoch 4 after the OOM
    assert (ep.gpu_ids.astype(str) != "").all()  # every trial ran on a (logical) GPU, the resumed ones too
    assert "retrying from its last checkpoint with GPU share 0.25" in r.stdout
    # each went on from a checkpoint: its first epoch is the killed run's row, recovered from Tune's result files
    for name in (a, b):
        assert ep[(ep.trial == name) & (ep.epoch == 1)].pid.tolist() == \
            before[(before.trial == name) & (before.epoch == 1)].pid.tolist()


def write_image_folder(root: Path, side: int, per_class: int, classes=("a", "b")) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_an_image_folder_loads_at_the_model_input_side_and_counts_in_the_memory_estimate(tmp_path):
    import dataclasses
    from raybench.configs import DataSpec, Recipe, TrialSpec
    from raybench.sizing import trial_memory_bytes
    from raybench.train import Trial
    small = write_image_folder(tmp_path / "small", 64, 3)
    large = write_image_folder(tmp_path / "large", 64, 8)
    spec = TrialSpec(dataclasses.replace(TINY_VIT, image_size=64, num_classes=2), Recipe(epochs=1, batch_size=4),
                     DataSpec("imagefolder", str(small)))
    trial = Trial(spec, device="cpu")
    assert tuple(trial.data.train_x.shape[1:]) == (3, 64, 64)  # not shrunk to 32 px on load
    bigger = dataclasses.replace(spec, data=DataSpec("imagefolder", str(large)))
    # 4 classes-and-splits x 5 more images, each 3 x 64 x 64 uint8 on the device
    assert trial_memory_bytes(bigger) - trial_memory_bytes(spec) == 4 * 5 * 3 * 64 * 64


def test_the_seed_study_fits_four_gpus_because_cached_fine_tunes_are_charged_for_their_head():
    """A frozen, feature-cached Swin's steps run only its 768 x 100 head: it gets the smallest share, and the
    whole seed study asks for at most the 4 GPUs it is run with (it asked for 5.125 when the fine-tunes were
    charged a backbone forward per step)."""
    from raybench.experiments import load_experiment
    from raybench.sizing import MIN_FRACTION, gpu_fraction, step_flops
    trials = {t.name: t for t in load_experiment("seed").trials}
    shares = {name: gpu_fraction(t) for name, t in trials.items()}
    assert shares["swin-tiny-ft-seed"] == shares["swin-small-ft-seed"] == MIN_FRACTION
    assert step_flops(trials["swin-small-ft-seed"]) == 3 * 2 * 768 * 100 * 32
    assert shares["swin-tiny-scratch-seed"] == 1.0  # the same backbone trained: 3 x 9 GFLOPs x 32 per step
    assert sum(shares.values()) <= 4, shares
