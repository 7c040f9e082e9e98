"""`python -m raybench.slurm`: a study as a SLURM batch job. Writes the sbatch script (and with --submit submits
it); the job starts Ray on its nodes (raybench.slurmjob), runs `python -m raybench.grid` on the first one, and
where the time limit comes first, stops the run cleanly and submits its own follow-up with --resume.

    python -m raybench.slurm --nodes 2 --gpus-per-node 4 --cpus-per-node 32 --mem 200G --time 24:00:00 \\
        --partition gpu --results-dir /shared/$USER/raybench --submit -- --experiment seed --data-dir /shared/data

See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from raybench.slurmjob import RAY_TEMP

# Seconds before the time limit at which SLURM warns the job: Tune's stop, Ray's shutdown and the follow-up's
# submission take well under a minute; SLURM may send the warning up to a minute early.
DEFAULT_WARNING_S = 300
# File systems that every node of a cluster sees (/proc/mounts names); tmpfs and ramfs never are.
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cifs", "smb3", "glusterfs", "fuse.glusterfs",
             "panfs", "wekafs", "fuse.sshfs", "9p", "virtiofs", "fuse.juicefs", "cvmfs")
NODE_LOCAL_FS = ("tmpfs", "ramfs", "devtmpfs")
GRID_ARGS_OWNED = ("--address", "--resume")  # the job script sets them


class SlurmError(Exception):
    """Bad input or a SLURM that refuses the job: one line for the user."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raybench.slurm",
        usage="python -m raybench.slurm [options] -- [raybench.grid arguments]",
        description="Write (and with --submit submit) a SLURM batch script that runs a raybench study on Ray "
                    "across the job's nodes; the run continues in follow-up jobs when the time limit comes first.")
    p.add_argument("--nodes", type=int, default=1, help="nodes, one Ray node each (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: 0)")
    p.add_argument("--gpu-request", choices=("gres", "gpus-per-task"), default="gres",
                   help="how the script asks for GPUs: --gres=gpu:N or --gpus-per-task=N (default: gres)")
    p.add_argument("--cpus-per-node", type=int, default=4, help="CPUs per node (default: 4)")
    p.add_argument("--mem", help="memory per node, SLURM's syntax (e.g. 64G; default: the partition's default)")
    p.add_argument("--partition", help="partition (default: the cluster's default)")
    p.add_argument("--account", help="account to charge (default: yours)")
    p.add_argument("--time", default="24:00:00", help="time limit of each job, SLURM's syntax (default: 24:00:00)")
    p.add_argument("--warning", type=int, default=DEFAULT_WARNING_S, metavar="SECONDS",
                   help=f"stop the run this long before the time limit and continue in a follow-up job "
                        f"(default: {DEFAULT_WARNING_S})")
    p.add_argument("--max-jobs", type=int, default=20,
                   help="the most jobs a study may take, follow-ups included (default: 20)")
    p.add_argument("--results-dir", default="results",
                   help="where the run folder goes: a folder every node sees (default: results)")
    p.add_argument("--job-name", help="SLURM job name (default: raybench-<run>)")
    p.add_argument("--script", help="where to write the batch script (default: <run folder>/slurm/job.sbatch)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python with raybench installed, as the nodes see it (default: this one)")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


# --- checks ---------------------------------------------------------------------------------------------------

TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(text: str) -> int:
    """SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = TIME_RE.match(text.strip())
    if not m:
        raise SlurmError(f"--time={text!r}: not a SLURM time (minutes, HH:MM:SS, or D-HH:MM:SS)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:
        h, mi, s = a, b or 0, c or 0
    elif b is None:
        h, mi, s = 0, a, 0
    elif c is None:
        h, mi, s = 0, a, b
    else:
        h, mi, s = a, b, c
    total = (days or 0) * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise SlurmError(f"--time={text!r}: must be at least one minute")
    return total


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (its nearest existing folder), from /proc/mounts."""
    p = path
    while not p.exists():
        p = p.parent
    p = p.resolve()
    best, kind = "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1].replace("\\040", " ")
            if (str(p) == mount or str(p).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def check(opts, grid_args: list[str]) -> None:
    """Raises SlurmError for options SLURM or the run would refuse."""
    for flag, value, ok, accepted in [("--nodes", opts.nodes, opts.nodes >= 1, ">= 1"),
                                      ("--gpus-per-node", opts.gpus_per_node, opts.gpus_per_node >= 0, ">= 0"),
                                      ("--cpus-per-node", opts.cpus_per_node, opts.cpus_per_node >= 1, ">= 1"),
                                      ("--warning", opts.warning, opts.warning >= 30, ">= 30 seconds"),
                                      ("--max-jobs", opts.max_jobs, opts.max_jobs >= 1, ">= 1")]:
        if not ok:
            raise SlurmError(f"{flag}={value}: must be {accepted}")
    limit = time_limit_seconds(opts.time)
    if opts.warning >= limit:
        raise SlurmError(f"--warning={opts.warning}: must be below the time limit (--time {opts.time} is "
                         f"{limit} s), else every job stops before it starts")
    for owned in GRID_ARGS_OWNED:
        if any(a == owned or a.startswith(owned + "=") for a in grid_args):
            raise SlurmError(f"{owned} after --: the job script sets it (the job's own Ray cluster; --resume in "
                             "every follow-up job)")
    if not Path(opts.python).exists():
        raise SlurmError(f"--python {opts.python}: no such file; give the Python with raybench installed")


def check_results_dir(results_dir: Path) -> list[str]:
    """Raises SlurmError for a folder only this machine sees; returns a warning for one that may be."""
    fs = file_system(results_dir)
    if fs in NODE_LOCAL_FS:
        raise SlurmError(f"--results-dir {results_dir}: on a {fs} file system, which only this machine sees; the "
                         "job's nodes and its follow-up jobs need a folder on the shared file system (your "
                         "cluster's home or scratch)")
    if fs and fs not in SHARED_FS:
        return [f"--results-dir {results_dir} is on a local {fs} file system: make sure every node of the cluster "
                "sees it (a follow-up job may run on another node)"]
    return []


def parse_grid(grid_args: list[str]):
    """The grid's own parser and checks, before anything is written or submitted."""
    from raybench.experiments import ExperimentError, load_experiment
    from raybench.grid import get_args_parser as grid_parser, validate_args
    try:
        args = grid_parser().parse_args(grid_args)
    except SystemExit as e:  # argparse has printed its error line
        raise SlurmError(f"the raybench.grid arguments after -- are not valid: {' '.join(grid_args)}") from e
    try:
        validate_args(args)
        load_experiment(args.experiment)
    except (ExperimentError, FileNotFoundError) as e:
        raise SlurmError(str(e)) from None
    return args


# --- the script -----------------------------------------------------------------------------------------------

def run_name(grid) -> str:
    return grid.name or f"{Path(grid.experiment).stem}-{datetime.now():%Y%m%d-%H%M%S}"


def sbatch_script(opts, grid_args: list[str], grid, run_dir: Path, script: Path) -> str:
    q = shlex.quote
    n, c, g = opts.nodes, opts.cpus_per_node, opts.gpus_per_node
    directives = [f"--job-name={opts.job_name or 'raybench-' + run_dir.name}", f"--nodes={n}",
                  "--ntasks-per-node=1", f"--cpus-per-task={c}", f"--time={opts.time}",
                  # a warning signal to the batch shell only (B:), which passes SIGTERM to the driver; USR1 rather
                  # than TERM, which scancel also sends to the shell, so that a cancelled job is not continued
                  f"--signal=B:USR1@{opts.warning}",
                  "--requeue",  # preempted or its node lost: SLURM runs the script again, which resumes
                  "--open-mode=append", f"--output={run_dir}/slurm/%j.out"]
    if g:
        directives.append(f"--gres=gpu:{g}" if opts.gpu_request == "gres" else f"--gpus-per-task={g}")
    if opts.mem:
        directives.append(f"--mem={opts.mem}")
    if opts.partition:
        directives.append(f"--partition={opts.partition}")
    if opts.account:
        directives.append(f"--account={opts.account}")
    keep = strip_flags(grid_args, ("--results-dir", "--name"))
    driver = [opts.python, "-u", "-m", "raybench.grid", *keep, "--results-dir", str(run_dir.parent),
              "--name", run_dir.name]
    bin_dir = str(Path(opts.python).parent)
    launcher = " --no-dashboard" if grid.no_dashboard else ""
    temp = RAY_TEMP.format(job="$SLURM_JOB_ID")
    sbatch_again = ["sbatch", *(["--partition", opts.partition] if opts.partition else []),
                    *(["--account", opts.account] if opts.account else [])]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             f"# Written by: python -m raybench.slurm {' '.join(q(a) for a in sys.argv[1:])}",
             "# One task per node starts Ray with this job's own ports and temp folder (raybench.slurmjob); the",
             "# first runs the study. SLURM's warning before the time limit (USR1) reaches the driver as SIGTERM: it",
             "# stops keeping every finished epoch, and this script submits the follow-up job, which resumes.",
             "set -uo pipefail",
             f"export PATH={q(bin_dir)}:\"$PATH\"  # the env's ray, python and sbatch's own",
             "export PYTHONUNBUFFERED=1",
             f"cd {q(str(Path.cwd()))}",
             f"RUN_DIR={q(str(run_dir))}",
             f"SCRIPT={q(str(script))}",
             '# per run of the script: a requeued job runs it again under the same id',
             'JOB_DIR="$RUN_DIR/slurm/job-$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"',
             'mkdir -p "$JOB_DIR"',
             'JOBS=$(( ${RAYBENCH_SLURM_JOBS:-0} + 1 ))',
             'RESUME=(); [ -f "$RUN_DIR/experiment.json" ] && RESUME=(--resume)',
             f"echo \"[slurm] job $SLURM_JOB_ID ($JOBS of at most {opts.max_jobs}) on $(hostname): "
             "${RESUME[*]:-a new run}\"",
             "warned=0",
             "on_warning() {",
             "    warned=1",
             '    echo "[slurm] the time limit is near: stopping the run"',
             '    touch "$JOB_DIR/stop"  # read by the head task before it starts the driver',
             f'    pid=$(cat "{temp}/head.pid" 2>/dev/null) && kill -TERM "$pid"',
             "}",
             "trap on_warning USR1",
             f"srun --nodes={n} --ntasks={n} --ntasks-per-node=1 --cpus-per-task={c} --kill-on-bad-exit=0 \\",
             f"    {q(opts.python)} -m raybench.slurmjob --job-dir \"$JOB_DIR\" --cpus {c} --gpus {g}{launcher} -- \\",
             f"    {' '.join(q(a) for a in driver)} \"${{RESUME[@]}}\" &",
             "step=$!",
             "while true; do",
             '    wait "$step"; rc=$?',
             '    kill -0 "$step" 2>/dev/null || break  # a trapped signal ended the wait, not the step',
             "done",
             "# the head's Ray, where its task was killed before it could stop it (only this job's processes)",
             f"{q(opts.python)} -c \"from raybench.session import end_processes; "
             f"end_processes('{temp}')\"",
             f"if [ \"$warned\" = 1 ] && [ \"$rc\" = 143 ] && [ \"$JOBS\" -lt {opts.max_jobs} ]; then",
             f"    next=$(RAYBENCH_SLURM_JOBS=$JOBS {' '.join(q(a) for a in sbatch_again)} --parsable "
             '--dependency=afterany:$SLURM_JOB_ID "$SCRIPT") &&',
             '        echo "[slurm] follow-up job $next continues the run" ||',
             '        echo "[slurm] error: could not submit the follow-up job; continue with: sbatch $SCRIPT"',
             "elif [ \"$warned\" = 1 ] && [ \"$rc\" = 143 ]; then",
             f"    echo \"[slurm] error: the run took {opts.max_jobs} jobs (--max-jobs); continue with: sbatch $SCRIPT\"",
             "fi",
             'exit "$rc"', ""]
    return "\n".join(lines)


def strip_flags(args: list[str], flags: tuple) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


# --- sbatch ---------------------------------------------------------------------------------------------------

def sbatch(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("sbatch")
    if exe is None:
        raise SlurmError("sbatch is not on PATH: submit from a machine of the SLURM cluster (a login node), or "
                         "leave out --submit and take the script there")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def refusal(r: subprocess.CompletedProcess) -> str:
    text = " ".join(l.strip() for l in (r.stderr or r.stdout).splitlines() if "error" in l.lower()) or \
        (r.stderr or r.stdout).strip()
    return re.sub(r"^sbatch: error: ", "", text)


def submit(script: Path) -> str:
    """Ask SLURM whether it would take the job (sbatch --test-only), then submit it; returns the job id."""
    r = sbatch("--test-only", str(script))
    if r.returncode != 0:
        raise SlurmError(f"SLURM refuses the job: {refusal(r)} (nothing submitted)")
    r = sbatch("--parsable", str(script))
    if r.returncode != 0:
        raise SlurmError(f"sbatch failed: {refusal(r)} (the script is {script})")
    return r.stdout.strip().split(";")[0]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, grid_args = split_argv(argv)
    opts = get_args_parser().parse_args(own)
    try:
        check(opts, grid_args)
        grid = parse_grid(grid_args)
        given = "--results-dir" in grid_args or any(a.startswith("--results-dir=") for a in grid_args)
        results_dir = Path(grid.results_dir if given else opts.results_dir).expanduser().resolve()
        warnings = check_results_dir(results_dir)
        run_dir = results_dir / run_name(grid)
        script = Path(opts.script).expanduser().resolve() if opts.script else run_dir / "slurm" / "job.sbatch"
        if opts.submit:
            sbatch("--version")  # sbatch missing: say so before anything is written
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"[slurm] warning: {w}", flush=True)
    fresh = not run_dir.exists()
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(sbatch_script(opts, grid_args, grid, run_dir, script))
    if not opts.submit:
        print(f"[slurm] batch script: {script}\n[slurm] submit it with: sbatch {script}")
        return 0
    try:
        job = submit(script)
    except SlurmError as e:
        if fresh:  # nothing of a job SLURM refused stays behind
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[slurm] batch script: {script}\n[slurm] submitted job {job}; results: {run_dir}; its output: "
          f"{run_dir}/slurm/{job}.out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
