"""`python -m raybench.grid`: an experiment's trials as one Ray Tune run sharing GPUs, resumable, with
results written to Parquet as they arrive and the analysis run at the end.

    python -m raybench.grid                          # the smoke experiment, on what this machine has
    python -m raybench.grid --experiment seed --gpus 4 --data-dir data
    python -m raybench.grid --experiment full --address auto --storage-path s3://bucket/raybench
    python -m raybench.grid --experiment seed --name seed-run1 --resume
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from raybench.configs import TrialSpec
from raybench.experiments import Experiment, ExperimentError, builtin_experiments, load_experiment
from raybench.records import git_commit

# Tune snapshots the experiment state every >= 10 s by default; a driver stopped sooner would restore to
# the start and re-run finished trials. One second keeps --resume honest for short runs too.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# ... which makes Tune warn about frequent snapshots after every epoch; the frequency is deliberate.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

# --- the resource rule ------------------------------------------------------------------------------------
# A trial's GPU fraction is the larger of two shares, rounded up to a power of two between MIN_FRACTION and 1
# (powers of two so packed trials fill a GPU exactly):
# - compute: training FLOPs per step, 3 x forward FLOPs x batch (forward plus a backward of about twice the
#   forward; 1 x for a frozen backbone), over FULL_GPU_STEP_FLOPS, a step that keeps a whole GPU busy;
# - memory: trial_memory_bytes (weights, gradients, Adam moments and the batch's saved activations, measured in
#   fp32; the dataset held on the GPU; a frozen backbone's cached features) plus CUDA_OVERHEAD_BYTES, over the
#   GPU's memory (--gpu-memory-gb; default the first CUDA device's, else 80 GB).
# Tune does not split GPU memory: on CUDA each trial caps its allocator at its share less CUDA_OVERHEAD_BYTES
# (torch.cuda.set_per_process_memory_fraction; the CUDA context lives outside the allocator), so a packed
# neighbour cannot starve it, and a trial whose share of the real GPU is below its estimate fails at once.
FULL_GPU_STEP_FLOPS = 1e12
CUDA_OVERHEAD_BYTES = 1.0e9  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack
DEFAULT_GPU_MEMORY_GB = 80.0
MIN_FRACTION = 1 / 8


def trial_memory_bytes(spec: TrialSpec) -> int:
    """GPU memory one trial is estimated to use, the CUDA context aside. Not counted: the transient
    activations of no-grad passes (evaluation and the feature pass run at batch 256), and image folders."""
    from raybench.complexity import swin_arch, training_memory_bytes
    from raybench.data import CIFAR_TEST, CIFAR_TRAIN
    from raybench.train import CACHE_ON, feature_cache_mode
    images = {"synthetic": spec.data.train_size + spec.data.test_size,
              "cifar100": CIFAR_TRAIN + CIFAR_TEST}.get(spec.data.name, 0)
    total = training_memory_bytes(spec.model, spec.recipe.batch_size) + images * 3 * 32 * 32  # uint8, 32 px
    if feature_cache_mode(spec) == CACHE_ON:
        a = swin_arch(spec.model)
        total += images * 4 * a["embed_dim"] * 2 ** (len(a["depths"]) - 1)  # fp32 pooled features
    return total


def gpu_fraction(spec: TrialSpec, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> float:
    from raybench.complexity import complexity
    cx = complexity(spec.model)
    passes = 1 if spec.model.frozen_backbone else 3
    compute = passes * cx.flops * spec.recipe.batch_size / FULL_GPU_STEP_FLOPS
    memory = (trial_memory_bytes(spec) + CUDA_OVERHEAD_BYTES) / (gpu_memory_gb * 1e9)
    share = max(compute, memory)
    if share >= 1:
        return 1.0
    return max(MIN_FRACTION, 2.0 ** math.ceil(math.log2(share)))


def allocator_fraction(name: str, need: int, share: float, gpu_bytes: int) -> float:
    """The cap for a trial's CUDA caching allocator: its share of this GPU less the CUDA context's room.
    Raises when that is below the trial's estimate `need` (trial_memory_bytes, computed by the driver): the
    share was sized for a larger GPU (a driver on a machine without CUDA assumes --gpu-memory-gb, default
    80 GB), and the trial would run out mid-epoch."""
    cap = share * gpu_bytes - CUDA_OVERHEAD_BYTES
    if cap < need:
        raise RuntimeError(
            f"{name}: its GPU share {share:g} of this {gpu_bytes / 1e9:.0f} GB GPU leaves {cap / 1e9:.2f} GB "
            f"after the CUDA context, below the {need / 1e9:.2f} GB it is estimated to need; run the grid with "
            f"--gpu-memory-gb {gpu_bytes / 1e9:.0f} so the shares are sized for this GPU")
    return cap / gpu_bytes


def trial_resources(spec: TrialSpec, gpus: float, cpus_per_trial: float, override: dict,
                    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB) -> dict:
    """{"cpu": c, "gpu": g} for one trial: the rule above, the experiment's overrides, no GPU when gpus == 0."""
    res = {"cpu": cpus_per_trial, "gpu": 0.0}
    if gpus > 0 and "gpu" not in override:
        res["gpu"] = gpu_fraction(spec, gpu_memory_gb)
    res.update(override)
    if gpus <= 0:
        res["gpu"] = 0.0
    return res


# --- the trial, as Ray Tune runs it -----------------------------------------------------------------------

def _tune_trainable():
    """The Ray Tune trainable, built on first use so that importing raybench.grid does not import Ray."""
    import ray
    import torch
    from ray import tune
    from raybench.train import STATUS_OK, STATUS_RUNNING, Trial

    class StudyTrial(tune.Trainable):
        """One TrialSpec as a Tune class trainable: one `step` per epoch, Tune's checkpoints hold the
        Trial's state, and `__repr__` is the trial name, which Ray shows for the actor in its dashboard
        and log prefixes (a function trainable shows as `ImplicitFunc`)."""

        def setup(self, config: dict):
            spec = TrialSpec.from_dict(config["trial"]["spec"])
            res = config["trial"]["resources"]
            use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
            if use_cuda and res["gpu"] < 1:  # before the trial allocates anything
                torch.cuda.set_per_process_memory_fraction(allocator_fraction(
                    spec.name, config["trial"]["memory_bytes"], res["gpu"],
                    torch.cuda.get_device_properties(0).total_memory))
            self.trial = Trial(spec, device="cuda" if use_cuda else "cpu", threads=max(1, int(res["cpu"])))
            self.node_id = ray.get_runtime_context().get_node_id()
            self.records = None  # the epoch iterator starts at the first step, after any checkpoint load

        def step(self) -> dict:
            if self.records is None:
                self.records = self.trial.epochs()
            rec = next(self.records, None)
            if rec is None:  # restored from the checkpoint of its last epoch: it has ended, say how
                rec = {"epoch": self.trial.epoch,
                       "status": STATUS_OK if self.trial.status == STATUS_RUNNING else self.trial.status}
            rec.update(node_id=self.node_id, gpu_ids=",".join(map(str, ray.get_gpu_ids())),
                       done=rec["status"] != STATUS_RUNNING)
            return rec

        def save_checkpoint(self, checkpoint_dir: str):
            self.trial.save(Path(checkpoint_dir) / "state.pt")

        def load_checkpoint(self, checkpoint_dir: str):
            self.trial.load(Path(checkpoint_dir) / "state.pt")

        def __repr__(self):
            return self.trial_name or "raybench-trial"

    return StudyTrial


# --- CLI --------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.grid", description=(
        "Run an experiment's trials as one Ray Tune run. Results: <results-dir>/<run>/epochs.parquet and "
        "trials.parquet, then the analysis (tables, plots, report.md)."))
    p.add_argument("--experiment", default="smoke",
                   help=f"built-in name ({', '.join(builtin_experiments())}) or a YAML file (default: smoke)")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs to use: without --address, start a local Ray with this many (logical on a machine "
                        "without CUDA: a scheduling dry run, training on CPU; default: the CUDA devices here); "
                        "with --address, a cap on the GPUs the grid uses (default: no cap, trials ask for GPU "
                        "fractions); 0 runs everything on CPU")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--cpus", type=int, help="CPUs for a local Ray (default: all of this machine's)")
    p.add_argument("--gpu-memory-gb", type=float,
                   help="GPU memory the resource rule packs trials into (default: the first CUDA device's, "
                        f"else {DEFAULT_GPU_MEMORY_GB:g})")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, also its torch threads (default: 1)")
    p.add_argument("--epochs", type=int, help="override every trial's epochs (default: the experiment's)")
    p.add_argument("--dataset", choices=["synthetic", "cifar100", "imagefolder"],
                   help="override the experiment's dataset (default: the experiment's)")
    p.add_argument("--data-dir", help="CIFAR-100 copy / download folder, or an image folder root")
    p.add_argument("--train-size", type=int, help="synthetic training images (default: the experiment's)")
    p.add_argument("--test-size", type=int, help="synthetic test images (default: the experiment's)")
    p.add_argument("--seeds", help="repeat every trial with these seeds: N (0..N-1) or a list '0,3,7' "
                                   "(default: the experiment's)")
    p.add_argument("--only", help="run the trials whose names match this pattern (glob, or a substring)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every trial's model; compile time is recorded apart from epoch time "
                        "(default: off)")
    p.add_argument("--results-dir", default="results", help="where run folders go (default: results)")
    p.add_argument("--name", help="run name, the folder under --results-dir (default: <experiment>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name (default: the newest run of this experiment) where it stopped")
    p.add_argument("--storage-path", help="Ray Tune storage for checkpoints: a folder or a URI such as "
                                          "s3://bucket/prefix, which a multi-node cluster needs "
                                          "(default: <results-dir>/<run>/ray)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial from its last checkpoint (default: 2)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="address the local Ray dashboard binds to (default: 127.0.0.1; 0.0.0.0 exposes it, "
                        "and with it job submission, to your network)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    p.add_argument("--no-analysis", action="store_true", help="skip the analysis at the end")
    p.add_argument("--dry-run", action="store_true", help="print the trials and their resources, start nothing")
    return p


def gpu_memory_gb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return DEFAULT_GPU_MEMORY_GB


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()] if "," in text else None
        n = int(text) if seeds is None else len(seeds)
    except ValueError:
        raise ExperimentError(f"--seeds={text!r}: expected a count N or a list like '0,3,7'") from None
    if seeds is not None:
        return check_seeds(text, seeds)
    if n < 1:
        raise ExperimentError(f"--seeds={text!r}: the count must be >= 1")
    return list(range(n))


def check_seeds(text: str, seeds: list[int]) -> list[int]:
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice or not seeds:
        raise ExperimentError(f"--seeds={text!r}: " + (f"seed {twice[0]} appears twice" if twice else "no seed"))
    return seeds


def select(exp: Experiment, pattern: str | None) -> Experiment:
    if not pattern:
        return exp
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    chosen = [t for t in exp.trials if fnmatch.fnmatch(t.name, glob)]
    if not chosen:
        raise ExperimentError(f"--only={pattern!r} matches no trial of {exp.name}: "
                              f"{', '.join(t.name for t in exp.trials)}")
    return dataclasses.replace(exp, trials=chosen)


def validate_args(args) -> None:
    checks = [("--gpus", args.gpus, lambda v: v >= 0), ("--cpus", args.cpus, lambda v: v >= 1),
              ("--cpus-per-trial", args.cpus_per_trial, lambda v: v > 0),
              ("--gpu-memory-gb", args.gpu_memory_gb, lambda v: v > 0), ("--epochs", args.epochs, lambda v: v >= 1),
              ("--max-failures", args.max_failures, lambda v: v >= 0),
              ("--train-size", args.train_size, lambda v: v >= 1), ("--test-size", args.test_size, lambda v: v >= 1)]
    for flag, value, ok in checks:
        if value is not None and not ok(value):
            raise ExperimentError(f"{flag}={value}: out of range")
    if args.gpus is not None and args.gpus != int(args.gpus):
        if not args.address:
            raise ExperimentError(f"--gpus={args.gpus:g}: a local Ray gets whole GPUs (trials share them by their "
                                  "fractions); a fraction only caps a cluster's GPUs, with --address")
        if args.gpus > 1:
            raise ExperimentError(f"--gpus={args.gpus:g}: a fraction must be <= 1, else a whole number")
    if args.resume and args.storage_path and "://" in args.storage_path and not args.name:
        raise ExperimentError("--resume with a remote --storage-path needs --name")


def read_run_record(path: Path) -> dict:
    """A run folder's experiment.json; a damaged one is an error that names it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExperimentError(f"{path}: cannot be read ({e}); pass --name for another run") from None


def find_run(results_dir: Path, experiment: str) -> Path | None:
    runs = []
    for p in results_dir.glob("*/experiment.json"):
        try:
            if read_run_record(p).get("experiment") == experiment:
                runs.append(p.parent)
        except ExperimentError as e:  # someone else's damaged folder must not block resuming this run
            print(f"[grid] warning: {e}", file=sys.stderr)
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def check_writable(results_dir: Path) -> None:
    """Refuse a --results-dir that cannot hold run folders, before anything is started."""
    p = results_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ExperimentError(f"--results-dir {results_dir}: {p} is not a folder this user can write to")


def start_ray(args, gpus: float):
    """Join the cluster at --address, or start a local Ray that listens on 127.0.0.1 only."""
    import ray
    if args.address:
        ctx = ray.init(address=args.address, log_to_driver=False)
    else:
        ctx = ray.init(num_cpus=args.cpus, num_gpus=math.ceil(gpus), include_dashboard=not args.no_dashboard,
                       dashboard_host=args.dashboard_host, log_to_driver=False)
    return ctx


def unfit(resources: dict[str, dict], have_cpu: float, have_gpu: float) -> str | None:
    """Why a trial cannot be placed on a cluster with these resources, or None. Such a trial would stay
    PENDING forever with nothing but log warnings, so the grid says so before fit()."""
    for name, r in resources.items():
        if r["gpu"] > have_gpu or r["cpu"] > have_cpu:
            return (f"trial {name} asks for {r['cpu']:g} CPU and {r['gpu']:g} GPU, but the cluster has "
                    f"{have_cpu:g} CPU and {have_gpu:g} GPU")
    return None


def preflight(exp: Experiment) -> list[str]:
    """What would make trials fail at start (data or pretrained weights that cannot be had), found now."""
    from raybench.data import DatasetUnavailable, check_available
    from raybench.models import WeightsUnavailable, check_weights
    problems = []
    for data in dict.fromkeys(t.data for t in exp.trials):
        try:
            check_available(data)
        except DatasetUnavailable as e:
            problems.append(str(e))
    for model in dict.fromkeys(t.model for t in exp.trials):
        try:
            check_weights(model)
        except WeightsUnavailable as e:
            problems.append(f"{model.name}: {e}")
    return problems


def max_concurrent(resources: dict[str, dict], gpu_cap: float | None) -> int:
    """On a cluster, --gpus N caps the GPUs in use: at most as many trials as the largest fractions fit in N."""
    if gpu_cap is None:
        return 0  # no cap
    fractions = sorted((r["gpu"] for r in resources.values()), reverse=True)
    if not fractions or fractions[0] == 0:
        return 0
    n, used = 0, 0.0
    for f in fractions:
        if used + f > gpu_cap + 1e-9:
            break
        used, n = used + f, n + 1
    return max(1, n)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    t_start = time.time()
    from raybench.models.hub import WeightsUnavailable
    try:
        validate_args(args)
        exp = load_experiment(args.experiment, epochs=args.epochs, dataset=args.dataset, data_dir=args.data_dir,
                              seeds=parse_seeds(args.seeds), train_size=args.train_size, test_size=args.test_size)
        exp = select(exp, args.only)
        if args.compile:
            exp = dataclasses.replace(exp, trials=[dataclasses.replace(t, compile=True) for t in exp.trials])
        if args.address:  # a cluster: fractions unless --gpus 0; --gpus N caps the GPUs in use
            gpus = 1.0 if args.gpus is None else args.gpus
        elif args.gpus is None:
            import torch
            gpus = float(torch.cuda.device_count())
        else:
            import torch
            gpus, have = args.gpus, torch.cuda.device_count()
            if have and gpus > have:  # Ray would hand out ids of GPUs that do not exist: those trials run on CPU
                raise ExperimentError(f"--gpus={args.gpus:g}: this machine has {have} CUDA device(s); ask for at "
                                      f"most {have}, or join a cluster with --address")
        memory_gb = args.gpu_memory_gb or gpu_memory_gb()
        if args.address and not args.gpu_memory_gb and gpus > 0 and memory_gb == DEFAULT_GPU_MEMORY_GB:
            print(f"[grid] note: no CUDA device on this machine: GPU shares are sized for a {memory_gb:g} GB GPU; "
                  "pass --gpu-memory-gb with the workers' GPU memory (a trial whose share is too small for it "
                  "fails at start and says so)", flush=True)
        resources = {t.name: trial_resources(t, gpus, args.cpus_per_trial, exp.resources.get(t.name, {}), memory_gb)
                     for t in exp.trials}
        results_dir = Path(args.results_dir).expanduser().resolve()
        check_writable(results_dir)
        if args.storage_path and "://" not in args.storage_path:  # Tune takes a local path as absolute only
            args.storage_path = str(Path(args.storage_path).expanduser().resolve())
        storage_path = args.storage_path
        if args.resume:
            run_dir = results_dir / args.name if args.name else find_run(results_dir, exp.name)
            if run_dir is None or not (run_dir / "experiment.json").exists():
                raise ExperimentError(f"--resume: no run of {exp.name!r} under {results_dir} "
                                      f"(looked for {run_dir or results_dir / '*'}/experiment.json)")
            # A resumed run is the run that was started: its trials, resources and storage, whatever the
            # flags say now (Tune restores those trials; other ones would never run).
            saved = read_run_record(run_dir / "experiment.json")
            exp = dataclasses.replace(exp, trials=[TrialSpec.from_dict(v["spec"]) for v in saved["trials"].values()])
            resources = {name: v["resources"] for name, v in saved["trials"].items()}
            storage_path = storage_path or saved["args"].get("storage_path")
            changed = [f for f in ("epochs", "dataset", "data_dir", "seeds", "only", "train_size", "test_size")
                       if getattr(args, f) is not None]
            if changed:
                print(f"[grid] note: --resume continues the run as it was started; ignoring "
                      f"{', '.join('--' + f.replace('_', '-') for f in changed)}", flush=True)
        else:
            run_dir = results_dir / (args.name or f"{exp.name}-{datetime.now():%Y%m%d-%H%M%S}")
            if (run_dir / "experiment.json").exists():
                raise ExperimentError(f"run folder {run_dir} already holds a run: pass --resume to continue it, "
                                      "or another --name")
        if not args.address:
            msg = unfit(resources, args.cpus or os.cpu_count(), math.ceil(gpus))
            if msg:
                raise ExperimentError(f"{msg}: use --gpus 0 to train on CPU, or give the local Ray more with "
                                      "--gpus / --cpus (or lower the experiment's resources)")
    except (ExperimentError, FileNotFoundError, WeightsUnavailable) as e:  # a Swin checkpoint's config unreadable
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"[grid] experiment {exp.name} ({exp.path}): {len(exp.trials)} trials, {exp.trials[0].data.name} data")
    for t in exp.trials:
        r = resources[t.name]
        mem = ""
        if r["gpu"] > 0:
            mem = f"  est. memory {trial_memory_bytes(t) / 1e9:.2f} GB"
        print(f"[grid]   {t.name:<40} cpu {r['cpu']:g}  gpu {r['gpu']:g}  epochs {t.recipe.epochs}{mem}")
    problems = preflight(exp)
    if problems and not args.address and not args.dry_run:
        print("error: " + "\n".join(problems), file=sys.stderr)
        return 2
    for p in problems:  # on a cluster the workers may have what this machine lacks
        print(f"[grid] warning: {p}", flush=True)
    if args.dry_run:
        return 0
    if not args.address:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            print("[grid] warning: Ray was imported before raybench.grid, so the local Ray's services will "
                  "listen on all interfaces; run `python -m raybench.grid` in its own process to keep them on "
                  "127.0.0.1", flush=True)
        # A local Ray of Ray 2.60 binds its GCS, raylet and agents on all interfaces unless this is off
        # before `import ray` (it is read at import): then every service listens on 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if args.dashboard_host not in ("127.0.0.1", "localhost", "::1") and not args.no_dashboard:
            print(f"[grid] warning: --dashboard-host {args.dashboard_host}: the Ray dashboard and its job "
                  "submission API (which runs arbitrary code) are reachable from other machines", flush=True)
    return run(args, exp, resources, run_dir, storage_path, gpus, t_start)


def run(args, exp: Experiment, resources: dict, run_dir: Path, storage_path: str | None, gpus: float,
        t_start: float) -> int:
    from filelock import FileLock, Timeout
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # two drivers on one run folder would overwrite each other's Parquet rows
        lock = FileLock(str(run_dir / ".grid.lock"), timeout=0)
        lock.acquire()
    except Timeout:
        print(f"error: another `python -m raybench.grid` is running on {run_dir}", file=sys.stderr)
        return 2
    try:
        return _run_locked(args, exp, resources, run_dir, storage_path, gpus, t_start)
    finally:
        lock.release()


def _run_locked(args, exp: Experiment, resources: dict, run_dir: Path, storage_path: str | None, gpus: float,
                t_start: float) -> int:
    import ray
    from ray import tune
    from raybench.results import RUN_DIR_ENV, ResultsWriter, trial_rows

    storage = storage_path or str(run_dir)
    tune_name = "ray" if not storage_path else run_dir.name
    commit = git_commit()
    if not args.resume:  # written whole or not at all: --resume trusts it
        tmp = run_dir / ".experiment.json.tmp"
        tmp.write_text(json.dumps({
            "experiment": exp.name, "path": exp.path, "args": vars(args), "git_commit": commit,
            "trials": {t.name: {"spec": t.to_dict(), "resources": resources[t.name]} for t in exp.trials}},
            indent=1))
        os.replace(tmp, run_dir / "experiment.json")
    writer = ResultsWriter(run_dir, trial_rows(exp.trials, resources, commit))
    os.environ[RUN_DIR_ENV] = str(run_dir)  # for the restored writer of a resumed run (see raybench.results)

    ctx = start_ray(args, gpus)
    try:
        dash = getattr(ctx, "dashboard_url", None)
        if dash:
            print(f"[grid] Ray dashboard: http://{dash}", flush=True)
        if args.address:
            total = ray.cluster_resources()
            msg = unfit(resources, total.get("CPU", 0), total.get("GPU", 0))
            if msg:  # an autoscaling cluster adds nodes when trials ask: say so, do not refuse
                print(f"[grid] note: {msg} now; the trial waits for the autoscaler to add a node", flush=True)
        trainable = tune.with_resources(_tune_trainable(), lambda config: config["trial"]["resources"])
        tune_path = f"{storage.rstrip('/')}/{tune_name}"
        if args.resume and tune.Tuner.can_restore(tune_path):
            print(f"[grid] resuming {tune_path}", flush=True)
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True)
        else:
            if args.resume:  # stopped before Tune's first snapshot: the Parquet rows stay, trials start over
                print(f"[grid] no Tune state to restore at {tune_path}; starting the trials again", flush=True)
            cap = args.gpus if args.address else None
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([
                    {"name": t.name, "spec": t.to_dict(), "resources": resources[t.name],
                     # the estimate its GPU share came from, for setup to check against the real GPU
                     "memory_bytes": trial_memory_bytes(t) if 0 < resources[t.name]["gpu"] < 1 else 0}
                    for t in exp.trials])},
                tune_config=tune.TuneConfig(
                    trial_name_creator=lambda t: t.config["trial"]["name"],
                    trial_dirname_creator=lambda t: t.config["trial"]["name"],
                    max_concurrent_trials=max_concurrent(resources, cap)),
                run_config=tune.RunConfig(
                    name=tune_name, storage_path=storage, callbacks=[writer], verbose=0,
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1,
                                                            checkpoint_at_end=True)))
        tuner.fit()
    except KeyboardInterrupt:
        print(f"[grid] interrupted: finished epochs are in {run_dir}; continue with --resume --name {run_dir.name}",
              file=sys.stderr)
        return 130
    finally:
        ray.shutdown()

    print(writer.summary(), flush=True)
    unfinished = writer.unfinished()
    if unfinished:  # Ctrl+C (SIGINT) ends fit() gracefully, with Tune's state saved
        print(f"[grid] stopped with {len(unfinished)} trial(s) unfinished ({', '.join(unfinished)}); continue with: "
              f"python -m raybench.grid --experiment {exp.path} --results-dir {args.results_dir} "
              f"--name {run_dir.name} --resume", flush=True)
    if not args.no_analysis:
        try:
            from raybench.analysis import analyse
            report = analyse(run_dir)
            print(f"[grid] report: {report}")
        except Exception as e:  # the results are on disk either way; say why the report is missing
            print(f"[grid] analysis failed ({type(e).__name__}: {e}); rerun: python -m raybench.analysis {run_dir}",
                  file=sys.stderr)
    print(f"[grid] {time.time() - t_start:.0f} s in all; results: {run_dir}")
    return 0 if writer.all_ok() else 1


if __name__ == "__main__":
    sys.exit(main())
