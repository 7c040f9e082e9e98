"""The run plan: everything one `python -m raybench.grid` run does, decided before Ray starts and frozen.

Built from the command line for a new run, or from the run folder's experiment.json on `--resume` (a resumed
run is the run that was started: its trials, resources, storage and local Ray, unless a flag is given again).
The grid takes the plan and nothing else; experiment.json is the plan written down.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from raybench.configs import TrialSpec
from raybench.experiments import Experiment, ExperimentError, load_experiment
from raybench import sizing as rr
from raybench.records import SCHEMA, SchemaError, check_schema

# The settings a run keeps across --resume. Each is a grid flag whose parser default is None, so a flag given
# again on the command line can be told from one left out.
LOCAL_RAY_SETTINGS = ("gpus", "cpus", "cpus_per_trial", "gpu_memory_gb", "dashboard_host", "no_dashboard")
# How Tune runs the trials: the scheduler and the MLflow store. Kept on --resume, so a resumed ASHA run goes on
# with ASHA (the trials it stopped stay stopped) and keeps logging where it logged.
TUNE_SETTINGS = ("scheduler", "asha_grace_epochs", "mlflow", "grow_min_epoch_s")
# --mlflow without a URI: a store inside the run folder, resolved where the folder is now (it may have moved
# between a stop and --resume). SQLite: MLflow 3 refuses its file store (./mlruns) unless told to allow it.
MLFLOW_IN_RUN_FOLDER = "run-folder"
MLFLOW_DB = "mlflow.db"
DEFAULTS = {"cpus_per_trial": 1.0, "dashboard_host": "127.0.0.1", "no_dashboard": False, "max_failures": 2,
            "pending_timeout": None, "scheduler": "fifo", "asha_grace_epochs": 3, "mlflow": None,
            "grow_min_epoch_s": 20.0}
# Fields of an experiment that a resumed run takes from experiment.json, whatever the flags say now.
FROZEN_BY_RESUME = ("epochs", "dataset", "data_dir", "seeds", "only", "train_size", "test_size", "compile",
                    "precision")


@dataclass(frozen=True)
class LocalRay:
    """How to start the local Ray when the run joins no cluster."""
    gpus: int  # whole GPUs it offers (logical ones on a machine without CUDA: a scheduling dry run)
    cpus: int | None  # None: all of this machine's
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"


@dataclass(frozen=True)
class RunPlan:
    experiment: Experiment  # the trials, after --only, --compile, --precision, --seeds ...
    resources: dict  # trial name -> {"cpu": c, "gpu": g}
    memory_bytes: dict  # trial name -> the estimate its GPU share came from (0 without a GPU share)
    run_dir: Path
    storage_path: str | None  # Tune storage given by the user (absolute folder or URI); None: the run folder
    address: str | None  # the cluster to join; None: start `local`
    local: LocalRay | None
    settings: dict  # the flags that shaped the plan, as experiment.json keeps them for --resume
    resume: bool = False
    gpu_cap: float | None = None  # on a cluster: --gpus N caps the GPUs in use
    max_failures: int = 2
    pending_timeout_s: float | None = None  # stop a run whose pending trials have waited this long
    given: tuple = ()  # the settings given as flags this time (the rest: from experiment.json or defaults)
    git_commit: str = ""
    notes: list = field(default_factory=list)  # what the driver should tell the user before it starts

    @property
    def tune_name(self) -> str:
        return "ray" if not self.storage_path else self.run_dir.name

    @property
    def storage(self) -> str:
        return self.storage_path or str(self.run_dir)

    @property
    def tune_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.tune_name}"

    @property
    def mlflow_uri(self) -> str | None:
        uri = self.settings.get("mlflow")
        return f"sqlite:///{self.run_dir / MLFLOW_DB}" if uri == MLFLOW_IN_RUN_FOLDER else uri

    def param_entries(self) -> list[dict]:
        """One entry per trial for Tune's grid_search: small plain values; the trial builds the rest."""
        return [{"name": t.name, "spec": t.to_dict(), "resources": self.resources[t.name],
                 "memory_bytes": self.memory_bytes[t.name]} for t in self.experiment.trials]

    def record(self) -> dict:
        return {"schema": SCHEMA, "experiment": self.experiment.name, "path": self.experiment.path,
                "git_commit": self.git_commit, "settings": self.settings,
                "trials": {t.name: {"spec": t.to_dict(), "resources": self.resources[t.name],
                                    "memory_bytes": self.memory_bytes[t.name]} for t in self.experiment.trials}}

    def resume_command(self) -> str:
        return (f"python -m raybench.grid --experiment {self.experiment.path} --results-dir "
                f"{self.run_dir.parent} --name {self.run_dir.name} --resume")


# --- pieces --------------------------------------------------------------------------------------------------

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


def read_run_record(path: Path) -> dict:
    """A run folder's experiment.json; a damaged one, or one of a schema this raybench does not read, is an error
    that names it."""
    try:
        record = json.loads(path.read_text())
        check_schema(record.get("schema"), path)
    except (OSError, json.JSONDecodeError, SchemaError) as e:
        raise ExperimentError(f"{path}: cannot be read ({e}); pass --name for another run") from None
    return record


def write_run_record(plan: RunPlan) -> None:
    """Written whole or not at all: --resume trusts it."""
    tmp = plan.run_dir / ".experiment.json.tmp"
    tmp.write_text(json.dumps(plan.record(), indent=1))
    os.replace(tmp, plan.run_dir / "experiment.json")


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


def cluster_address(args) -> str | None:
    """--address, else RAY_ADDRESS (which `ray job submit` sets for the drivers it starts), else None: the run
    starts its own local Ray. An address file a past `ray start` left behind is never followed."""
    return args.address or os.environ.get("RAY_ADDRESS") or None


# --- the plan ------------------------------------------------------------------------------------------------

def make_plan(args, check=None) -> RunPlan:
    """The run `args` (parsed by raybench.grid's parser) asks for; raises ExperimentError naming what is wrong.
    `check(experiment, address)`, when given, runs once the trials are known and before they are sized (sizing
    builds every model: a minute for the full study), so that missing data is reported first."""
    from raybench.records import git_commit
    results_dir = Path(args.results_dir).expanduser().resolve()
    check_writable(results_dir)
    saved, run_dir = None, None
    if args.resume:
        run_dir = results_dir / args.name if args.name else find_run(results_dir, _experiment_name(args))
        if run_dir is None or not (run_dir / "experiment.json").exists():
            raise ExperimentError(f"--resume: no run of {_experiment_name(args)!r} under {results_dir} "
                                  f"(looked for {run_dir or results_dir / '*'}/experiment.json)")
        saved = read_run_record(run_dir / "experiment.json")
    settings = _settings(args, saved)
    address = cluster_address(args)
    gpus = _gpus(settings, address)
    if saved is None:
        exp = _experiment(args, settings)
        run_dir = results_dir / (args.name or f"{exp.name}-{datetime.now():%Y%m%d-%H%M%S}")
        if (run_dir / "experiment.json").exists():
            raise ExperimentError(f"run folder {run_dir} already holds a run: pass --resume to continue it, "
                                  "or another --name")
        if check:
            check(exp, address)
        memory_gb = settings["gpu_memory_gb"] or rr.gpu_memory_gb()
        memory = {t.name: rr.trial_memory_bytes(t) if gpus > 0 else 0 for t in exp.trials}
        resources = {t.name: rr.trial_resources(t, gpus, settings["cpus_per_trial"], exp.resources.get(t.name, {}),
                                                memory_gb, memory[t.name]) for t in exp.trials}
        memory = {n: (m if resources[n]["gpu"] > 0 else 0) for n, m in memory.items()}
    else:  # Tune restores exactly these trials; other ones would never run
        exp = load_experiment(saved["path"]) if Path(saved["path"]).exists() else load_experiment(args.experiment)
        exp = dataclasses.replace(exp, trials=[TrialSpec.from_dict(v["spec"]) for v in saved["trials"].values()])
        resources = {n: v["resources"] for n, v in saved["trials"].items()}
        memory = {n: v.get("memory_bytes", 0) for n, v in saved["trials"].items()}
        if check:
            check(exp, address)
    notes = _notes(args, saved, address, gpus, settings)
    local = None if address else LocalRay(math.ceil(gpus), settings["cpus"], not settings["no_dashboard"],
                                          settings["dashboard_host"])
    if local:
        node = {"CPU": local.cpus or os.cpu_count(), "GPU": local.gpus}
        msg = rr.unfit(resources, [node])
        if msg:
            raise ExperimentError(f"{msg}: {_unfit_hint(resources, node)}")
    timeout = settings["pending_timeout"]
    return RunPlan(exp, resources, memory, run_dir, settings["storage_path"], address, local, settings,
                   resume=saved is not None, gpu_cap=settings["gpus"] if address else None,
                   max_failures=settings["max_failures"], pending_timeout_s=None if timeout is None else 60 * timeout,
                   given=tuple(k for k in settings if getattr(args, k, None) is not None),
                   git_commit=git_commit(), notes=notes)


def _unfit_hint(resources: dict, node: dict) -> str:
    """What to change so that every trial fits the local Ray: the resource the trials ask too much of."""
    hints = []
    cpus = max(r["cpu"] for r in resources.values())
    if cpus > node["CPU"] + 1e-9:
        hints.append(f"lower --cpus-per-trial (or the experiment's resources.cpu) to at most {node['CPU']:g}"
                     + (f", or start the local Ray with --cpus {math.ceil(cpus)}" if cpus <= (os.cpu_count() or 1)
                        else f" (this machine has {os.cpu_count()} CPUs)"))
    if max(r["gpu"] for r in resources.values()) > node["GPU"] + 1e-9:
        hints.append("use --gpus 0 to train on CPU, or give the local Ray more GPUs with --gpus (or lower the "
                     "experiment's resources.gpu)")
    return "; ".join(hints)


def _experiment_name(args) -> str:
    p = Path(args.experiment)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return load_experiment(args.experiment).name
    return args.experiment


def _settings(args, saved: dict | None) -> dict:
    """The run's settings: a flag given now wins, then what experiment.json kept, then the default."""
    before = {} if saved is None else saved.get("settings", {})
    out = {}
    for key in (*LOCAL_RAY_SETTINGS, "max_failures", "pending_timeout", "storage_path", *TUNE_SETTINGS):
        now = getattr(args, key, None)
        out[key] = now if now is not None else before.get(key, DEFAULTS.get(key))
    if out["storage_path"] and "://" not in out["storage_path"]:  # Tune takes a local path as absolute only
        out["storage_path"] = str(Path(out["storage_path"]).expanduser().resolve())
    for key in FROZEN_BY_RESUME:
        out[key] = getattr(args, key, None) if saved is None else before.get(key)
    return out


def _gpus(settings: dict, address: str | None) -> float:
    import torch
    if address:  # a cluster: fractions unless --gpus 0; --gpus N caps the GPUs in use
        return 1.0 if settings["gpus"] is None else settings["gpus"]
    if settings["gpus"] is None:
        return float(torch.cuda.device_count())
    have = torch.cuda.device_count()
    if have and settings["gpus"] > have:  # Ray would hand out ids of GPUs that do not exist: trials on CPU
        raise ExperimentError(f"--gpus={settings['gpus']:g}: this machine has {have} CUDA device(s); ask for at "
                              f"most {have}, or join a cluster with --address")
    return settings["gpus"]


def _experiment(args, settings: dict) -> Experiment:
    exp = load_experiment(args.experiment, epochs=args.epochs, dataset=args.dataset, data_dir=args.data_dir,
                          seeds=parse_seeds(args.seeds), train_size=args.train_size, test_size=args.test_size,
                          precision=args.precision)
    exp = select(exp, args.only)
    if args.compile:
        exp = dataclasses.replace(exp, trials=[dataclasses.replace(t, compile=True) for t in exp.trials])
    return exp


def _notes(args, saved, address, gpus, settings) -> list[str]:
    notes = []
    if saved is not None:
        ignored = [f for f in FROZEN_BY_RESUME if getattr(args, f, None) not in (None, False)]
        if ignored:
            notes.append("--resume continues the run as it was started; ignoring "
                         + ", ".join("--" + f.replace("_", "-") for f in ignored))
    if address and not args.address:
        notes.append(f"RAY_ADDRESS={address} is set (as `ray job submit` does): joining that cluster instead "
                     "of starting a local Ray")
    if address and not settings["gpu_memory_gb"] and gpus > 0 and rr.gpu_memory_gb() == rr.DEFAULT_GPU_MEMORY_GB:
        notes.append(f"no CUDA device on this machine: GPU shares are sized for a {rr.DEFAULT_GPU_MEMORY_GB:g} GB "
                     "GPU; pass --gpu-memory-gb with the workers' GPU memory (a trial whose share is too small "
                     "for it fails at start and says so)")
    return notes
