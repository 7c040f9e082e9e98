"""raybench on SLURM, against a real SLURM on this machine (scripts/slurm-local.sh: Debian's slurm-wlm and munge,
slurmctld and slurmd on localhost): the smoke study submitted with `python -m raybench.slurm --submit` completes; a job
ended by its time limit is continued by its follow-up job, every epoch once; both ran at once on the one node,
each with its own Ray. Bad input is refused before anything is submitted. Skipped, saying why, where SLURM
cannot run (not root, the packages missing)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import slurm_scenario as scenario
from slurm_scenario import EPOCHS, squeue

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
    try:
        conf, was_up = scenario.start_local_slurm()
    except scenario.Unavailable as e:
        pytest.skip(str(e))
    os.environ["SLURM_CONF"] = conf  # for sbatch and squeue here, and through sbatch for the jobs' own sbatch
    yield conf
    if not was_up:
        subprocess.run(["bash", str(scenario.SLURM_LOCAL), "stop"], timeout=60)


@pytest.fixture(scope="module")
def two_jobs(slurm, tmp_path_factory):
    """tests/slurm_scenario.py's two studies: `small`, the smoke study, and the time-limited `limited`."""
    results = tmp_path_factory.mktemp("slurm-results")
    state = scenario.run(results)
    return results, state["seen_together"], state["cut"], state["printed"]


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
    """The smoke study (every family), at one epoch of 200 images, in one job on one CPU."""
    from raybench.experiments import load_experiment
    results, _, _, printed = two_jobs
    run_dir = results / "small"
    assert f"[slurm] batch script: {run_dir}/slurm/job.sbatch" in printed and "[slurm] submitted job" in printed
    smoke = sorted(t.name for t in load_experiment("smoke").trials)
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert sorted(trials.trial) == smoke and (trials.status == "ok").all()
    assert sorted(pd.read_parquet(run_dir / "epochs.parquet").trial) == smoke  # one epoch each
    assert (run_dir / "analysis" / "report.md").stat().st_size > 0
    [(job, out)] = outputs(run_dir)
    assert f"[grid] {len(smoke)} trials: {len(smoke)} ok" in out and "Traceback" not in out, out[-3000:]
    assert "dashboard 127.0.0.1:" in out  # the job's dashboard, on loopback only


def test_a_job_ended_by_its_time_limit_is_resumed_by_its_follow_up_job(two_jobs):
    results, _, cut, _ = two_jobs
    run_dir = results / "limited"
    jobs = outputs(run_dir)
    assert cut is not None and [j for j, _ in jobs][:1] == [cut] and len(jobs) == 2, jobs
    (first, out), (follow_up, resumed) = jobs
    assert "[slurm] the time limit is near: stopping the run" in out, out[-3000:]
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
