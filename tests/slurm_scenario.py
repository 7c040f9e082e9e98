"""The SLURM scenario tests/test_slurm.py checks: two studies submitted at once to the local SLURM
(scripts/slurm-local.sh), one of which is ended by its time limit and continued by its follow-up job."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SLURM_LOCAL = ROOT / "scripts" / "slurm-local.sh"
JOBS = ("raybench-limited", "raybench-small")
# The time-limited study trains a model whose training steps wait instead of computing while the scenario holds
# them (a `waiting.hold` file beside the module): its first job is long in time and costs almost no CPU, which
# the tests running beside it on the other xdist worker need. 40 epochs of about 1.2 s outlast the first job's
# two epochs, the up to 30 s from the cut to the warning and the stop; the scenario lets go once that job has
# ended, so its follow-up trains the rest at the linear model's own speed.
EPOCHS = 40
WAITING_MODEL = """
import time
from pathlib import Path

import torch

HOLD = Path(__file__).with_suffix(".hold")


class Waiting(torch.nn.Module):
    def __init__(self, num_classes, seconds):
        super().__init__()
        self.fc, self.seconds = torch.nn.Linear(3 * 32 * 32, num_classes), seconds

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and HOLD.exists():
            time.sleep(self.seconds)
        return self.fc(x.flatten(1))


def waiting(num_classes=10, seconds=0.25):
    return Waiting(num_classes, seconds)
"""


class Unavailable(Exception):
    """SLURM cannot run here; the message says why (the tests skip with it)."""


def start_local_slurm() -> tuple[str, bool]:
    """(SLURM_CONF, whether it was up before) of the local SLURM, started by scripts/slurm-local.sh if needed."""
    if os.geteuid() != 0:
        raise Unavailable("a local SLURM needs root (slurmd starts jobs as their users)")
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c) is None]
    if missing:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    was_up = subprocess.run(["bash", str(SLURM_LOCAL), "status"]).returncode == 0
    r = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise Unavailable(f"the local SLURM did not start: {r.stderr.strip()[-500:]}")
    return re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1), was_up


def squeue(*names) -> dict:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {int(i): (n, s) for i, n, s in rows if n in names}


def elapsed_s(job: int) -> int:
    text = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%M"], capture_output=True, text=True).stdout.strip()
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    return int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def read_epochs(run_dir: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(run_dir / "epochs.parquet")
    except (FileNotFoundError, OSError):
        return pd.DataFrame(columns=["trial", "epoch", "pid"])


def submit(*args) -> str:
    """`python -m raybench.slurm ARGS`, as a user runs it on a login node (in this process: torch, which checking
    the experiment imports, is here already); what it printed."""
    import contextlib
    import io
    from raybench.slurm import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    if rc != 0:
        raise AssertionError(f"raybench.slurm {args}: exit {rc}\n{err.getvalue()[-3000:]}")
    return out.getvalue()


def run(results: Path) -> dict:
    """Two studies submitted at once to the one node (two CPUs, one each): `small`, the smoke study at one epoch
    of 200 images, which completes in its job, and `limited`, whose first job reaches its time limit. Once that
    job has recorded two epochs its limit is cut (`scontrol update TimeLimit`, as a user may shorten a running
    job) to end 270 to 330 s later. SLURM sends the warning at its first check (every 30 s) once the limit is
    within --warning (300 s) + 30 s: at most 30 s after the cut; the driver stops, keeping its finished epochs,
    and the job submits its follow-up, which resumes the run with the ten minutes asked for.
    Cutting the limit once epochs are in makes the first job's share certain; a first job's warning comes 30
    to 60 s after it starts with a two-minute limit, before Ray and the trial are up on a busy machine.
    Returns what the tests check beside the run folders: whether both jobs ran at once, the cut job's id and
    what `python -m raybench.slurm` printed."""
    (results / "waiting.py").write_text(WAITING_MODEL)
    (results / "waiting.hold").touch()
    (results / "limited.yaml").write_text("name: limited\ndataset: {name: synthetic, train_size: 200, test_size: 100}\n"
                                          "num_classes: 10\nmodels: [py:waiting:waiting]\n")
    printed = submit("--cpus-per-node", 1, "--time", 10, "--warning", 300, "--results-dir", results,
                     "--submit", "--", "--experiment", results / "limited.yaml", "--gpus", "0", "--epochs", EPOCHS,
                     "--name", "limited", "--no-analysis", "--no-dashboard")
    printed += submit("--cpus-per-node", 1, "--time", 10, "--results-dir", results, "--submit", "--",
                      "--gpus", "0", "--epochs", 1, "--train-size", 200, "--test-size", 100, "--name", "small")
    seen_together, cut, deadline = False, None, time.monotonic() + 600
    while time.monotonic() < deadline:
        jobs = squeue(*JOBS)
        running = {n for n, s in jobs.values() if s == "RUNNING"}
        seen_together = seen_together or running == set(JOBS)
        if not jobs:
            return {"seen_together": seen_together, "cut": cut, "printed": printed}
        if cut is not None and cut not in jobs:
            (results / "waiting.hold").unlink(missing_ok=True)
        if cut is None and len(read_epochs(results / "limited")) >= 2:
            [job] = [i for i, (n, _) in jobs.items() if n == "raybench-limited"]
            minutes = (elapsed_s(job) + 330) // 60
            r = subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise AssertionError(f"scontrol update: {r.stderr}")
            cut = job
        time.sleep(1)
    raise AssertionError(f"the jobs did not end within 10 minutes: {squeue(*JOBS)}")
