"""Faults the tests inject into a grid run in a process of its own; no module a user imports knows of them.

`oom_env(...)` is the environment to start `python -m raybench.grid` with: Ray calls `runtime_env` (through
RAY_RUNTIME_ENV_HOOK) when the driver starts Ray, which makes every Ray worker call `install` as it starts
(Ray's worker_process_setup_hook). From then on the worker's trials raise the CUDA OOM where
RAYBENCH_FAULT_OOM says: "TRIAL:EPOCH:BELOW[;TRIAL:EPOCH:BELOW...]" makes trial TRIAL raise
torch.cuda.OutOfMemoryError in epoch EPOCH while its GPU share is below BELOW, inside the trainer's own OOM
handling (as a real one would), so the re-queue is tested on a machine without CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path

OOM_ENV = "RAYBENCH_FAULT_OOM"


def oom_env(faults: str, env: dict | None = None) -> dict:
    """`env` (os.environ) with the OOM faults set up for a grid run started in it."""
    env = dict(os.environ if env is None else env)
    here = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)  # driver and workers
    return {**env, OOM_ENV: faults, "RAY_RUNTIME_ENV_HOOK": f"{__name__}.runtime_env"}


def runtime_env(env: dict | None) -> dict:
    """RAY_RUNTIME_ENV_HOOK: called by ray.init in the driver with the job's runtime_env."""
    return {**(env or {}), "worker_process_setup_hook": f"{__name__}.install"}


def install() -> None:
    """In each Ray worker as it starts: every trial it builds gets the faults meant for it."""
    from raybench.trainable import StudyTrial
    build = StudyTrial._build

    def build_with_faults(self, entry):
        trial = build(self, entry)
        inject_oom(trial, self.share)
        return trial
    StudyTrial._build = build_with_faults


def inject_oom(trial, share: float) -> None:
    import torch
    faults = [f.rsplit(":", 2) for f in os.environ.get(OOM_ENV, "").split(";") if f]
    mine = [(int(e), float(b)) for n, e, b in faults if n == trial.spec.name and share < float(b)]
    if not mine:
        return
    epoch, train_epoch = mine[0][0], trial.train_epoch

    def failing_train_epoch():
        if trial.epoch + 1 == epoch:
            raise torch.cuda.OutOfMemoryError(f"injected by {OOM_ENV}={os.environ[OOM_ENV]} at share {share:g}")
        return train_epoch()
    trial.train_epoch = failing_train_epoch
