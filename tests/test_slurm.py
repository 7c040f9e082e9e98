"""raybench on SLURM, against a real SLURM on this machine (scripts/slurm-local.sh: Debian's slurm-wlm and munge,
slurmctld and slurmd on localhost): the smoke study submitted with `python -m raybench.slurm --submit`
completes; a job ended by its time limit is continued by its follow-up job, every epoch once; both ran at once on
the one node, each with its own Ray. Bad input is refused before anything is submitted. Skipped, saying why, where SLURM
cannot run (not root, the packages missing)."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from test_grid import read_epochs

ROOT = Path(__file__).resolve().parent.parent
SLURM_LOCAL = ROOT / "scripts" / "slurm-local.sh"
# The time-limited study trains a model whose training steps wait instead of computing while the test holds
# them (a `waiting.hold` file beside the module): its first job is long in time and costs almost no CPU, which
# the tests running beside it on the other xdist worker need. 40 epochs of about 1.2 s outlast the first job's
# two epochs, the up to 30 s from the cut to the warning and the stop; the test lets go once that job has
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
pytestmark = pytest.mark.xdist_group("slurm")


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def slurm_cli(*args, env=None) -> Result:
    """`python -m raybench.slurm ARGS`, as a user runs it on a login node (in this process: torch, which checking
    the experiment imports, is here already)."""
    import contextlib
    import io
    from raybench.slurm import main
    out, err = io.StringIO(), io.StringIO()
    before = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return Result(rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def slurm():
    """The local SLURM's environment (SLURM_CONF), started by scripts/slurm-local.sh unless already up."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (slurmd starts jobs as their users)")
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    was_up = subprocess.run(["bash", str(SLURM_LOCAL), "status"]).returncode == 0
    r = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"the local SLURM did not start: {r.stderr.strip()[-500:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1)
    os.environ["SLURM_CONF"] = conf  # for sbatch and squeue here, and through sbatch for the jobs' own sbatch
    yield conf
    if not was_up:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], timeout=60)


def squeue(*names) -> dict:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {int(i): (n, s) for i, n, s in rows if n in names}


def elapsed_s(job: int) -> int:
    text = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%M"], capture_output=True, text=True).stdout.strip()
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    return int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


@pytest.fixture(scope="module")
def two_jobs(slurm, tmp_path_factory):
    """Two studies submitted at once to the one node (two CPUs, one each): `small`, the smoke study at one epoch
    of 200 images, which completes in its job, and `limited`, whose first job reaches its time limit. Once that
    job has recorded two epochs its limit is cut (`scontrol update TimeLimit`, as a user may shorten a running
    job) to end 270 to 330 s later. SLURM sends the warning at its first check (every 30 s) once the limit is
    within --warning (300 s) + 30 s: at most 30 s after the cut; the driver stops, keeping its finished epochs,
    and the job submits its follow-up, which resumes the run with the ten minutes asked for.
    Cutting the limit once epochs are in makes the first job's share certain; a first job's warning comes 30
    to 60 s after it starts with a two-minute limit, before Ray and the trial are up on a busy machine."""
    results = tmp_path_factory.mktemp("slurm-results")
    (results / "waiting.py").write_text(WAITING_MODEL)
    (results / "waiting.hold").touch()
    (results / "limited.yaml").write_text("name: limited\ndataset: {name: synthetic, train_size: 200, test_size: 100}\n"
                                          "num_classes: 10\nmodels: [py:waiting:waiting]\n")
    limited = slurm_cli("--cpus-per-node", 1, "--time", 10, "--warning", 300, "--results-dir", results, "--submit",
                        "--", "--experiment", results / "limited.yaml", "--gpus", "0", "--epochs", EPOCHS, "--name",
                        "limited", "--no-analysis")
    small = slurm_cli("--cpus-per-node", 1, "--time", 10, "--results-dir", results, "--submit", "--", "--gpus", "0",
                      "--epochs", 1, "--train-size", 200, "--test-size", 100, "--name", "small", "--no-dashboard")
    assert limited.returncode == 0 and small.returncode == 0, limited.stderr + small.stderr
    names = ("raybench-limited", "raybench-small")
    seen_together, cut, deadline = False, None, time.monotonic() + 600
    while time.monotonic() < deadline:
        jobs = squeue(*names)
        running = {n for n, s in jobs.values() if s == "RUNNING"}
        seen_together = seen_together or running == set(names)
        if not jobs:
            break
        if cut is not None and cut not in jobs:
            (results / "waiting.hold").unlink(missing_ok=True)
        if cut is None and len(read_epochs(results / "limited")) >= 2:
            [job] = [i for i, (n, _) in jobs.items() if n == "raybench-limited"]
            minutes = (elapsed_s(job) + 330) // 60
            r = subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
            cut = job
        time.sleep(1)
    else:
        pytest.fail(f"the jobs did not end within 10 minutes: {squeue(*names)}")
    return results, seen_together, cut, limited.stdout + small.stdout


def outputs(run_dir: Path) -> list[tuple[int, str]]:
    """The run's job outputs, oldest job first."""
    return sorted((int(p.stem), p.read_text()) for p in (run_dir / "slurm").glob("*.out"))


def every_epoch_once(run_dir: Path, epochs: int) -> pd.DataFrame:
    ep = pd.read_parquet(run_dir / "epochs.parquet")
    [trial] = pd.read_parquet(run_dir / "trials.parquet").trial
    assert sorted(zip(ep.trial, ep.epoch)) == [(trial, e) for e in range(1, epochs + 1)], ep
    assert (pd.read_parquet(run_dir / "trials.parquet").status == "ok").all()
    return ep


def test_the_smoke_study_submitted_with_raybench_slurm_completes(two_jobs):
    """The smoke study (every family), at one epoch of 200 images, in one job on one CPU. Its head runs no
    dashboard (--no-dashboard), so one trial's process takes the next (Tune's reuse_actors)."""
    from raybench.experiments import load_experiment
    results, _, _, printed = two_jobs
    run_dir = results / "small"
    assert f"[slurm] batch script: {run_dir}/slurm/job.sbatch" in printed and "[slurm] submitted job" in printed
    smoke = sorted(t.name for t in load_experiment("smoke").trials)
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert sorted(trials.trial) == smoke and (trials.status == "ok").all()
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert sorted(epochs.trial) == smoke  # one epoch each
    assert epochs.pid.nunique() < len(smoke)  # trials of equal resources followed each other in one process
    assert (run_dir / "analysis" / "report.md").stat().st_size > 0
    [(job, out)] = outputs(run_dir)
    assert f"[grid] {len(smoke)} trials: {len(smoke)} ok" in out and "error" not in out.lower(), out[-3000:]


def test_a_job_ended_by_its_time_limit_is_resumed_by_its_follow_up_job(two_jobs):
    results, _, cut, _ = two_jobs
    run_dir = results / "limited"
    jobs = outputs(run_dir)
    assert cut is not None and [j for j, _ in jobs][:1] == [cut] and len(jobs) == 2, jobs
    (first, out), (follow_up, resumed) = jobs
    assert "[slurm] the time limit is near: stopping the run" in out, out[-3000:]
    assert "dashboard 127.0.0.1:" in out  # the job's dashboard, on loopback only
    assert "[grid] SIGTERM: stopping the run; finished epochs are kept" in out
    kept = int(re.search(r"\[grid\] stopped by SIGTERM: 0/1 trials ended, (\d+) epochs kept", out).group(1))
    assert f"[slurm] follow-up job {follow_up} continues the run" in out
    assert "Traceback" not in out and "DUE TO TIME LIMIT" not in out, out[-3000:]
    assert f"[slurm] job {follow_up} (2 of at most 20)" in resumed and ": --resume" in resumed
    assert "[grid] 1 trials: 1 ok" in resumed, resumed[-3000:]
    ep = every_epoch_once(run_dir, EPOCHS)
    # the follow-up went on from the first job's last checkpoint: at most the epoch in progress is run again
    redone = re.findall(r"epoch +(\d+)/%d" % EPOCHS, resumed)
    assert kept >= 2 and int(redone[0]) in (kept, kept + 1), (kept, redone[:3])
    assert ep.pid.nunique() == 2  # one trial process in each job


def test_two_jobs_at_once_on_one_node_each_with_its_own_ray_both_finish(two_jobs):
    results, seen_together, _, _ = two_jobs
    assert seen_together
    heads = [re.search(r"Ray head at (\S+?)[;,]", out).group(1)
             for run in ("small", "limited") for _, out in outputs(results / run) if "Ray head at" in out]
    assert len(set(heads)) == len(heads) >= 3  # every job its own Ray, on its own ports
    import psutil
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if any(re.search(r"/tmp/rb-\d+-ray", a) for a in (p.info["cmdline"] or []))]
    assert not left  # each job stopped its own Ray


def test_what_slurm_refuses_is_refused_before_anything_is_submitted(slurm, tmp_path):
    before = squeue("raybench-refused")
    for args, message in [(["--partition", "nope"], "invalid partition"),
                          (["--gpus-per-node", 1], "invalid generic resource (gres) specification"),  # no GPU here
                          (["--cpus-per-node", 64], "requested node configuration is not available")]:
        r = slurm_cli("--cpus-per-node", 1, *args, "--results-dir", tmp_path, "--submit", "--", "--name", "refused")
        assert r.returncode == 2 and r.stderr.count("error: ") == 1, r.stderr
        assert message in r.stderr.lower() and "nothing submitted" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "refused").exists()
    assert squeue("raybench-refused") == before == {}
    # (an account SLURM does not know is refused only where it enforces accounts, with its database: not here)


def test_bad_input_is_refused_in_one_line_without_slurm(tmp_path):
    no_sbatch = {"PATH": str(Path(sys.executable).parent)}  # this Python's bin: no sbatch there
    cases = [(["--submit"], no_sbatch, "sbatch is not on PATH"),
             (["--results-dir", "/dev/shm/raybench"], {}, "on a tmpfs file system, which only this machine sees"),
             (["--time", "1", "--warning", "60"], {}, "--warning=60: must be below the time limit"),
             (["--time", "tomorrow"], {}, "--time='tomorrow': not a SLURM time"),
             (["--gpus-per-node", "-1"], {}, "--gpus-per-node=-1: must be >= 0")]
    for args, env, message in cases:
        results = [] if "--results-dir" in args else ["--results-dir", tmp_path]
        r = slurm_cli(*args, *results, "--", "--name", "bad", env=env)
        assert r.returncode == 2 and r.stderr.count("error: ") == 1 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()
    r = slurm_cli("--results-dir", tmp_path, "--", "--address", "auto")
    assert r.returncode == 2 and "--address after --: the job script sets it" in r.stderr


def test_the_script_asks_slurm_for_what_was_given(tmp_path):
    """Without a SLURM: the directives, GPUs both ways, and the driver's command line."""
    r = slurm_cli("--nodes", 2, "--gpus-per-node", 4, "--cpus-per-node", 16, "--mem", "64G", "--partition", "gpu",
                  "--account", "lab", "--time", "1-00:00:00", "--warning", 600, "--results-dir", tmp_path,
                  "--", "--experiment", "seed", "--data-dir", "/shared/data", "--name", "s1")
    assert r.returncode == 0, r.stderr
    script = (tmp_path / "s1" / "slurm" / "job.sbatch").read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--gres=gpu:4", "--mem=64G",
                      "--partition=gpu", "--account=lab", "--time=1-00:00:00", "--signal=B:USR1@600", "--requeue",
                      f"--output={tmp_path}/s1/slurm/%j.out"):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=16" in script
    assert "--cpus 16 --gpus 4 --" in script
    assert (f"-m raybench.grid --experiment seed --data-dir /shared/data --results-dir {tmp_path} --name s1 "
            '"${RESUME[@]}" &') in script
    assert "sbatch --partition gpu --account lab --parsable --dependency=afterany:$SLURM_JOB_ID" in script
    r = slurm_cli("--gpus-per-node", 2, "--gpu-request", "gpus-per-task", "--results-dir", tmp_path, "--script",
                  tmp_path / "other.sbatch", "--", "--name", "s2")
    script = (tmp_path / "other.sbatch").read_text()
    assert r.returncode == 0 and "#SBATCH --gpus-per-task=2\n" in script and "--gres" not in script


def test_jobs_sharing_a_node_get_ports_apart_and_skip_ports_in_use():
    from raybench.slurmjob import SLOT, job_ports, ray_temp_dir
    a, b = job_ports(41, taken=lambda p: False), job_ports(42, taken=lambda p: False)
    span = lambda ports: set(ports.values()) | set(range(ports["min-worker-port"], ports["max-worker-port"] + 1))
    assert not span(a) & span(b) and all(20000 <= p < 32768 for p in span(a) | span(b))
    held = span(b)  # where something else holds job 42's block, it takes the next one
    c = job_ports(42, taken=lambda p: p in held)
    assert c["port"] == b["port"] + SLOT and not span(c) & held
    assert ray_temp_dir(1) not in ray_temp_dir(11) and ray_temp_dir(11) not in ray_temp_dir(111)
