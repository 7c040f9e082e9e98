"""Shared fixtures and tiny configs: a tiny random Swin saved with save_pretrained (the offline stand-in for the
hub checkpoints), one tiny config per model family, and a small synthetic dataset. Everything is generated
here; nothing is downloaded."""
from __future__ import annotations

import os

import pytest

# Tests never reach the network: Hugging Face must answer from disk, and fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist the workers share the machine's cores: each worker, and every process it starts, gets its
# share of torch/OpenMP threads (1 for 2 workers on 2 cores) instead of one per core each. Oversubscribed, their
# OpenMP threads spin against each other and the same tests cost more CPU (docs/benchmarks.md, "The smoke study
# and the test suite"). Set before torch is imported; trials still set their own threads from their Ray CPUs.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# Even so, a grid's trials, its driver and Ray's daemons and the other worker's test share the cores: an OpenMP
# thread that waits for work spins on a core another process needs (OMP_WAIT_POLICY=ACTIVE-like, torch's
# default), and the same trainings then cost up to several times the CPU (docs/benchmarks.md). Waiting threads
# sleep instead; every process the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from raybench.configs import (HFConfig, PyConfig, ResNetConfig, SwinConfig, TorchvisionConfig,  # noqa: E402
                              ViTConfig)  # (after the environment above)

# The smallest ViT the tests train: one block of width 32 on 8x8 patches, 10 classes (the synthetic sets').
# Variants are `dataclasses.replace(TINY_VIT, ...)`.
TINY_VIT = ViTConfig(8, 32, 1, 2, 2.0, num_classes=10)
# The ViT the learning tests train (test_train, test_cuda): 4x4 patches, two blocks of width 64; one epoch of
# small_synthetic clears their threshold.
SMALL_VIT = ViTConfig(4, 64, 2, 2, 2.0, num_classes=10)

# Test ids of the tiny configs in `tiny_models`: one per built-in family and variant, and per source of the
# models the study does not build itself (torchvision:, hf:, py:).
TINY_MODELS = ("vit", "resnet18-cifar", "resnet18-imagenet", "swin-ft", "swin-scratch", "tv-mobilenet_v3_small",
               "hf-ft", "hf-scratch", "py")


@pytest.fixture(scope="session")
def tiny_swin_dir(tmp_path_factory):
    """A 2-stage Swin for 32x32 images with random weights and a 10-class head, written by save_pretrained."""
    import torch
    from transformers import SwinConfig as HFSwinConfig, SwinForImageClassification
    torch.manual_seed(0)
    cfg = HFSwinConfig(image_size=32, patch_size=2, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4,
                     num_labels=10)
    path = tmp_path_factory.mktemp("tiny-swin")
    SwinForImageClassification(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tiny_swin_dir) -> dict:
    """TINY_MODELS id -> config, 10 classes each: our counterpart of the registry timm's tests run every model
    of. The Swin and hf: ones load tiny_swin_dir's save_pretrained folder, as a user's checkpoint would; the
    py: one takes torchvision's resnet18 builder as the user's function (it passes num_classes through)."""
    return dict(zip(TINY_MODELS, (TINY_VIT, ResNetConfig("cifar", num_classes=10),
                                  ResNetConfig("imagenet", num_classes=10),
                                  SwinConfig(tiny_swin_dir, finetune=True, num_classes=10),
                                  SwinConfig(tiny_swin_dir, finetune=False, num_classes=10),
                                  TorchvisionConfig("mobilenet_v3_small", num_classes=10),
                                  HFConfig(tiny_swin_dir, finetune=True, num_classes=10),
                                  HFConfig(tiny_swin_dir, scratch=True, num_classes=10),
                                  PyConfig("torchvision.models", "resnet18", num_classes=10)), strict=True))


@pytest.fixture(scope="session")
def small_synthetic():
    """10 classes, 2000/500 images: chance is 10%, and 500 test images make 30% a 15-sigma event."""
    from raybench.data import synthetic
    return synthetic(2000, 500, num_classes=10)


def run_grid(*args, timeout=600, env=None, **kw):
    """`python -m raybench.grid ARGS` in a fresh process, as a user runs it."""
    import subprocess
    import sys
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "raybench.grid", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, **kw)


def cli_main(capsys, main, *args) -> tuple[int, str]:
    """A command's `main(ARGS)` in this process: (exit status, what it wrote to stderr). For input a command
    refuses, where a fresh process would only add its imports' seconds (2-3 s of CPU each here); one test per
    kind of refusal still runs the command in a process of its own, as a user's shell does."""
    capsys.readouterr()  # what earlier steps of the test printed
    try:
        rc = main(list(map(str, args)))
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """Grid runs calibrate their models (raybench.estimate) into one cache file for the whole session, shared by
    the xdist workers, never the user's ~/.cache/raybench: a model is timed once per session."""
    from raybench.estimate import CACHE_ENV
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "calibration.json"
    os.environ[CACHE_ENV] = str(path)
    return path


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago (the OS picked it)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grid_main(capsys, *args) -> tuple[int, str]:
    """`raybench.grid.main(ARGS)` in this process (cli_main), for input the grid refuses before Ray starts."""
    from raybench.grid import main
    return cli_main(capsys, main, *args)


def dashboard_get(url: str, path: str):
    """GET a dashboard API path; Ray's token auth (on by default) wants the token ray.init wrote."""
    import json
    import urllib.request
    from pathlib import Path
    token_file = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=10) as r:
        return json.loads(r.read())


def listening(root_pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of `root_pid` and its descendants."""
    import psutil
    procs = {root_pid: psutil.Process(root_pid)}
    procs.update({p.pid: p for p in procs[root_pid].children(recursive=True)})
    return [(procs[c.pid].name(), c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in procs]


@pytest.fixture(scope="session")
def smoke_watched(tmp_path_factory):
    """The README's main job: the smoke experiment, here with --gpus 2 on a machine without CUDA (a scheduling
    dry run: Ray packs trials by their GPU fractions while they train on CPU). While it runs, its Ray dashboard
    is asked what it shows and the grid's processes which sockets they listen on, so that the dashboard checks
    need no grid of their own (one Ray start fewer).

    The dashboard lists an actor that has ended too (DEAD, under the name it had), as its Actors page does: a
    tiny trial's actor is ALIVE for about a second, which a look every half second could miss."""
    import re
    import subprocess
    import sys
    import threading
    import time
    from types import SimpleNamespace

    import psutil
    from raybench.experiments import load_experiment
    trials = {t.name for t in load_experiment("smoke").trials}
    results = tmp_path_factory.mktemp("results")
    stderr = tmp_path_factory.mktemp("smoke-stderr") / "grid.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "raybench.grid", "--gpus", "2", "--results-dir",
                                 str(results), "--name", "smoke"], stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: list[str] = []

        def drain():  # a full pipe would block the grid while the loop below waits on the dashboard
            for line in proc.stdout:
                lines.append(line)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        trial_actors, jobs, sockets = set(), [], set()
        dashboard = re.compile(r"Ray dashboard: (http://\S+)")
        actors = "/api/v0/actors?detail=1&limit=100"  # alive and ended ones
        driver_running = lambda: any(j.get("type") == "DRIVER" and j.get("status") == "RUNNING" for j in jobs)
        try:
            deadline, next_sockets, url = time.time() + 600, 0.0, None
            # until every trial was seen and the driver running
            while (proc.poll() is None and time.time() < deadline
                   and not (trials <= trial_actors and driver_running())):
                if url is None:  # the grid prints it once, before any trial starts
                    m = dashboard.search("".join(lines))
                    url = m and m.group(1)
                if url:
                    try:
                        listed = dashboard_get(url, actors)["data"]["result"]["result"]
                        trial_actors |= {a.get("repr_name") for a in listed}
                        if not driver_running():
                            jobs += dashboard_get(url, "/api/jobs/")
                        if time.time() >= next_sockets:  # psutil reads every process's sockets: once a second
                            sockets |= set(listening(proc.pid))
                            next_sockets = time.time() + 1
                    except (OSError, ValueError, KeyError, psutil.Error):
                        # the dashboard is starting up or has stopped (the analysis runs after Ray), or a worker
                        # process ended between being listed and being asked for its name
                        pass
                time.sleep(0.5)
            proc.wait(timeout=max(1, deadline - time.time()))
        finally:
            proc.kill()
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:] + stderr.read_text()[-3000:]
    m = dashboard.search(out)
    return SimpleNamespace(run_dir=results / "smoke", stdout=out, dashboard_url=m and m.group(1),
                           trial_actors=trial_actors, jobs=jobs, sockets=sockets)


@pytest.fixture(scope="session")
def smoke_run(smoke_watched):
    """(run folder, the grid's stdout) of the session's smoke run."""
    return smoke_watched.run_dir, smoke_watched.stdout


# `scripts/test.sh` runs the suite on two xdist workers: most of a test's time here is waiting on a Ray start, a
# worker process's imports or a subprocess, so two at once keep both cores busy. Tests that share an expensive
# fixture are sent to one worker, so it is built once; any other test goes wherever a worker is free.
SHARED_FIXTURES = ("smoke_watched", "gpuless_head", "cpu_check", "tiny_bench", "cached_swin_run", "run_dir",
                   "local_ray")


# xdist hands out the groups first, largest first, then the other tests in collection order; the `slow` ones (a
# minute or two each) are moved ahead of the rest, so that the last minutes are short tests filling both
# workers rather than one long run on one of them while the other idles.
@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        shared = [f for f in SHARED_FIXTURES if f in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# The pytest process runs Ray, Tune and torch.compile in-process; their native threads outlive ray.shutdown() and
# once crashed the interpreter's teardown (SIGSEGV) after every test had passed. The suite's verdict is pytest's
# exit status, so the process ends with it as soon as pytest is done, skipping that teardown (every CLI the tests
# check runs in a process of its own and exits normally). The hunt for the cause is in git history (2458a7e).
_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _exit_status is not None:
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
