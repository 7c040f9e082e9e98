"""What a study will cost before it starts, and where it stands while it runs.

- Calibration: a few training steps and one evaluation batch of each distinct model (model, batch, precision,
  compile, input side, threads) timed on the device that will run it, with a frozen backbone's feature pass and
  the compile warm-up timed too (`calibrate`, through raybench.train.Trial on a small synthetic set: the same
  code path as a trial). Results are cached per device and raybench/torch version in `cache_path()`
  (RAYBENCH_CALIBRATION, else $XDG_CACHE_HOME/raybench/calibration.json, else ~/.cache/raybench/calibration.json).
- A device that cannot be timed here (a cluster's node type, seen only by its workers) is estimated from FLOPs
  at ASSUMED_FLOPS_PER_S, and every figure from it says "assumed".
- Packing: `simulate` places the trials' CPU and GPU fractions the way Ray does (a fraction below 1 on one GPU,
  whole GPUs for 1 or more) in the order Tune starts them, and gives each trial's start and end and the makespan.
- Progress: `eta` recomputes the trials' and the study's time left from the epochs measured so far.

Predicted seconds are the same sum trials.parquet's `total_time_s` is (raybench.records.epoch_summary): the
training and evaluation time of every epoch plus the one-off feature pass and compile warm-up. The wall time
adds TRIAL_START_S per trial (a Ray actor, torch imports, the data on the device), an assumption.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from raybench.configs import DataSpec, TrialSpec
from raybench.sizing import EVAL_BATCH, caches_features, input_side

CACHE_ENV = "RAYBENCH_CALIBRATION"
CAL_STEPS = 3  # timed training steps per model (after as many untimed ones: the first steps allocate)
# Assumed where nothing was timed: a node type the driver cannot reach before the run. Training FLOPs are
# 3 x forward (forward + a backward of about twice the forward).
ASSUMED_FLOPS_PER_S = {"gpu": 25e12, "cpu_thread": 10e9}
ASSUMPTION = ("assumed from FLOPs: a whole GPU sustains 25 TFLOP/s, a CPU thread 10 GFLOP/s, "
              "training FLOPs = 3 x forward")
TRIAL_START_S = 3.0  # per trial: actor start, imports, data to the device (assumed, not calibrated)
ESTIMATE_FILE = "estimate.json"  # in the run folder: what the epoch lines' ETAs are computed from


# --- prices -----------------------------------------------------------------------------------------------

def price(text: str) -> float:
    """argparse type of --gpu-hour-price / --cpu-hour-price: a number >= 0 (money per device-hour)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a price per device-hour, a number >= 0 (e.g. 2.5)")
    return value


PRICE_LABEL = "raybench-price-per-hour"  # a cluster.yaml node type's labels may carry its price per hour


def node_type_prices(cluster_config: dict) -> dict[str, float]:
    """Price per hour of each node type of a cluster-launcher config that says it, as a node label
    (`labels: {raybench-price-per-hour: "3.06"}`; Ray's schema allows string labels on node types, and Ray
    puts them on the node, so a driver can read them back from ray.nodes())."""
    out = {}
    for name, t in (cluster_config.get("available_node_types") or {}).items():
        v = (t.get("labels") or {}).get(PRICE_LABEL)
        if v is not None:
            try:
                out[name] = price(str(v))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"node type {name}: labels.{PRICE_LABEL}={e}") from None
    return out


def prices_from_nodes(nodes: list[dict]) -> tuple[float | None, float | None]:
    """(GPU-hour, CPU-hour) prices from the labels of a cluster's nodes (ray.nodes()): a node with GPUs charges
    its price over its GPUs, one without over its CPUs; the dearest node of each kind sets the price (an upper
    bound where kinds differ). None where no node says."""
    gpu, cpu = [], []
    for n in nodes:
        v, res = (n.get("Labels") or {}).get(PRICE_LABEL), n.get("Resources") or {}
        if v is None or not n.get("Alive", True):
            continue
        p = price(str(v))
        if res.get("GPU"):
            gpu.append(p / res["GPU"])
        elif res.get("CPU"):
            cpu.append(p / res["CPU"])
    return (max(gpu) if gpu else None), (max(cpu) if cpu else None)


# --- calibration ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Seconds one model takes on one device."""
    step_s: float  # one training step at the recipe's batch (on cached features where the trial caches them)
    eval_batch_s: float  # one evaluation batch of EVAL_BATCH images
    feature_s_per_image: float  # the frozen backbone's one-off feature pass, per image (0 without a cache)
    compile_s: float  # the compile warm-up (0 without compile)
    source: str  # "measured on <device>" or the assumption


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "raybench" / "calibration.json"


def device_label(device: str) -> str:
    """A device's name as the cache files it: the GPU's name, or the CPU's model (a home folder may be shared by
    machines of different kinds)."""
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        model = platform.processor() or "unknown"
    return f"cpu: {model}"


def version_label() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    try:
        mine = version("raybench")
    except PackageNotFoundError:
        mine = "unknown"
    return f"raybench {mine}, torch {torch.__version__}"


def timing_key(spec: TrialSpec, threads: int) -> str:
    """What a model's speed depends on: its config, batch, precision, compile, input side, feature cache, threads."""
    return json.dumps({"model": spec.to_dict()["model"], "batch": spec.recipe.batch_size,
                       "precision": spec.precision, "compile": spec.compile, "side": input_side(spec),
                       "cache": caches_features(spec), "threads": threads}, sort_keys=True)


def read_cache(path: Path) -> dict:
    """The cache file's entries; a missing file is empty, and a damaged one is empty with a warning (it is
    rebuilt by the next write)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("not a JSON object of objects")
        return data
    except (OSError, ValueError) as e:
        print(f"[estimate] warning: calibration cache {path} cannot be read ({e}); ignoring it and "
              "calibrating again", file=sys.stderr, flush=True)
        return {}


def write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def calibrate(spec: TrialSpec, device: str, threads: int) -> Timing:
    """Time `spec`'s model on `device` with `threads` CPU threads: CAL_STEPS training steps (after CAL_STEPS
    untimed ones), one evaluation batch, the feature pass and compile warm-up where the trial has them. Runs the
    trainer itself (raybench.train.Trial) on CAL_STEPS batches of synthetic images."""
    import torch
    from raybench.train import Trial, cache_features, compile_warm_up
    B = spec.recipe.batch_size
    small = dataclasses.replace(spec, data=DataSpec("synthetic", None, CAL_STEPS * B, EVAL_BATCH),
                                recipe=dataclasses.replace(spec.recipe, epochs=2))
    before = torch.get_num_threads()
    try:
        trial = Trial(small, device=device, threads=threads)
        images = CAL_STEPS * B + EVAL_BATCH
        feature_s = cache_features(trial) / images if trial.feature_cache == "on" else 0.0
        compile_s = compile_warm_up(trial) if trial.compile else 0.0
        trial.train_epoch()  # untimed: first-use allocations, lazy initialisation
        step_s = trial.train_epoch()["train_time_s"] / CAL_STEPS
        trial.evaluate()
        eval_s = trial.evaluate()["eval_time_s"]
    finally:
        torch.set_num_threads(before)
    return Timing(step_s, eval_s, feature_s, compile_s, f"measured on {device_label(device)}")


def calibrate_apart(spec: TrialSpec, device: str, threads: int) -> Timing:
    """`calibrate`, in a process of its own where the device is a GPU: the driver must not keep a CUDA context
    and the allocator's cached memory on a GPU its trials are about to share."""
    if not device.startswith("cuda"):
        return calibrate(spec, device, threads)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(calibrate, spec, device, threads).result()


def assumed_timing(spec: TrialSpec, device: str, threads: int) -> Timing:
    """From FLOPs at ASSUMED_FLOPS_PER_S, for a device that cannot be timed here."""
    from raybench.complexity import complexity
    from raybench.sizing import feature_dim
    fwd = float(complexity(spec.model).flops)  # one image's forward
    rate = ASSUMED_FLOPS_PER_S["gpu"] if device.startswith("cuda") else ASSUMED_FLOPS_PER_S["cpu_thread"] * threads
    B = spec.recipe.batch_size
    if caches_features(spec):
        head = 2.0 * feature_dim(spec.model) * spec.model.num_classes
        return Timing(3 * head * B / rate, head * EVAL_BATCH / rate, fwd / rate, 0.0, ASSUMPTION)
    per_image_train = (1.0 if spec.model.frozen_backbone else 3.0) * fwd
    return Timing(per_image_train * B / rate, fwd * EVAL_BATCH / rate, 0.0, 0.0, ASSUMPTION)


def timings(specs: list[TrialSpec], device_of: dict, threads_of: dict, recalibrate: bool = False,
            path: Path | None = None, log=print) -> dict[str, Timing]:
    """Every trial's Timing (by trial name). `device_of[name]` is "cpu" or "cuda" (timed here), or "assumed-cpu" /
    "assumed-cuda" (a device not reachable from here: from FLOPs). Each distinct model is calibrated once, looked up in the cache first
    (unless `recalibrate`); new measurements are written back."""
    from filelock import FileLock
    path = path or cache_path()
    out, cache, changed, fresh = {}, None, False, set()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # two drivers calibrating at once must not lose each other's entries
        for s in specs:
            device, threads = device_of[s.name], threads_of[s.name]
            if device.startswith("assumed-"):
                out[s.name] = assumed_timing(s, device.split("-", 1)[1], threads)
                continue
            if cache is None:
                cache = read_cache(path)
            book = cache.setdefault(f"{device_label(device)} | {version_label()}", {})
            key = timing_key(s, threads)
            entry = book.get(key)
            if (recalibrate and key not in fresh) or entry is None or not _valid(entry):
                log(f"[estimate] calibrating {s.model.name} (batch {s.recipe.batch_size}, {s.precision}"
                    f"{', compiled' if s.compile else ''}, {threads} thread(s)) on {device}")
                try:
                    entry = dataclasses.asdict(calibrate_apart(s, device, threads))
                except Exception as e:  # the run itself will say what is wrong with the model; estimate on
                    log(f"[estimate] warning: {s.model.name} cannot be timed ({type(e).__name__}: {e}); "
                        "its figures are assumed from FLOPs")
                    out[s.name] = assumed_timing(s, device, threads)
                    continue
                book[key], changed = entry, True
                fresh.add(key)
            out[s.name] = Timing(**entry)
        if changed:
            write_cache(path, cache)
    return out


def _valid(entry: dict) -> bool:
    fields = {f.name for f in dataclasses.fields(Timing)}
    return set(entry) == fields and all(isinstance(entry[f], (int, float)) and entry[f] >= 0
                                        for f in fields - {"source"})


# --- per trial --------------------------------------------------------------------------------------------

def split_sizes(spec: TrialSpec) -> tuple[int, int]:
    """(training images, test images) of the trial's data."""
    from raybench.data import CIFAR_TEST, CIFAR_TRAIN
    from raybench.sizing import IMAGE_SUFFIXES
    d = spec.data
    if d.name == "synthetic":
        return d.train_size, d.test_size
    if d.name == "cifar100":
        return CIFAR_TRAIN, CIFAR_TEST
    root = Path(d.data_dir).expanduser()
    return tuple(sum(f.lower().endswith(IMAGE_SUFFIXES) for _, _, files in os.walk(root / split) for f in files)
                 for split in ("train", "test"))


@dataclass(frozen=True)
class TrialEstimate:
    name: str
    epochs: int  # epochs left to run
    epoch_s: float  # one epoch: training steps and evaluation
    once_s: float  # the one-off feature pass and compile warm-up
    cpu: float
    gpu: float
    source: str
    done: int = 0  # epochs a resumed run had finished before

    @property
    def time_s(self) -> float:
        """What trials.parquet's total_time_s will say for the epochs left."""
        return self.once_s + self.epochs * self.epoch_s

    @property
    def wall_s(self) -> float:
        """How long it holds its resources."""
        return TRIAL_START_S + self.time_s


def trial_estimate(spec: TrialSpec, t: Timing, resources: dict, epochs_done: int = 0) -> TrialEstimate:
    n_train, n_test = split_sizes(spec)
    epoch_s = math.ceil(n_train / spec.recipe.batch_size) * t.step_s + n_test / EVAL_BATCH * t.eval_batch_s
    once_s = t.feature_s_per_image * (n_train + n_test) + t.compile_s
    return TrialEstimate(spec.name, max(0, spec.recipe.epochs - epochs_done), epoch_s, once_s,
                         float(resources["cpu"]), float(resources["gpu"]), t.source, epochs_done)


# --- packing ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: int = 0


EPS = 1e-9


def _place(node_free: list, cpu: float, gpu: float):
    """First node (and GPU) where the fractions fit, as Ray places them: a GPU fraction below 1 on one GPU,
    a whole number of GPUs as that many free GPUs. Returns (node index, GPU indices) or None."""
    for i, (cpus, gpus) in enumerate(node_free):
        if cpus + EPS < cpu:
            continue
        if gpu <= 0:
            return i, []
        if gpu < 1:
            for g, free in enumerate(gpus):
                if free + EPS >= gpu:
                    return i, [g]
            continue
        whole = [g for g, free in enumerate(gpus) if free >= 1 - EPS]
        if len(whole) >= math.ceil(gpu - EPS):
            return i, whole[:math.ceil(gpu - EPS)]
    return None


def simulate(jobs: list[tuple[str, float, float, float]], nodes: list[Node], max_concurrent: int = 0,
             now: float = 0.0) -> dict[str, tuple[float, float]]:
    """(start, end) of every job (name, cpu, gpu, seconds), started in list order as Tune does: whenever
    resources free up, every waiting job that fits now starts, earliest in the list first (a job that does not
    fit does not hold back the ones after it). `max_concurrent` > 0 caps the jobs running at once."""
    free = [[n.cpus, [1.0] * n.gpus] for n in nodes]
    for name, cpu, gpu, _ in jobs:
        if not any(_place([[n.cpus, [1.0] * n.gpus]], cpu, gpu) for n in nodes):
            raise ValueError(f"{name}: asks for {cpu:g} CPU and {gpu:g} GPU, which no node "
                             f"({', '.join(f'{n.cpus:g} CPU/{n.gpus} GPU' for n in nodes)}) can hold")
    waiting, running, out, t = list(jobs), [], {}, now
    while waiting or running:
        for job in list(waiting):
            if max_concurrent and len(running) >= max_concurrent:
                break
            spot = _place(free, job[1], job[2])
            if spot is None:
                continue
            i, gs = spot
            free[i][0] -= job[1]
            for g in gs:
                free[i][1][g] -= job[2] if job[2] < 1 else 1.0
            running.append((t + job[3], job, i, gs))
            out[job[0]] = (t, t + job[3])
            waiting.remove(job)
        running.sort(key=lambda r: r[0])
        end, job, i, gs = running.pop(0)
        t = end
        free[i][0] += job[1]
        for g in gs:
            free[i][1][g] += job[2] if job[2] < 1 else 1.0
    return out


def makespan(schedule: dict[str, tuple[float, float]], now: float = 0.0) -> float:
    return max((e for _, e in schedule.values()), default=now) - now


# --- the study --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyEstimate:
    trials: list  # TrialEstimate, in the order Tune starts them (longest first)
    nodes: list  # Node: the resources the simulation packed into ([] where unknown)
    max_concurrent: int
    wall_s: float  # the packed makespan
    gpu_hours: float
    cpu_hours: float
    gpu_hour_price: float | None = None
    cpu_hour_price: float | None = None
    notes: tuple = ()
    recalibrate: bool = False  # made with --recalibrate: a calibration on the cluster bypasses its cache too

    @property
    def cost(self) -> float | None:
        if self.gpu_hour_price is None and self.cpu_hour_price is None:
            return None
        return self.gpu_hours * (self.gpu_hour_price or 0.0) + self.cpu_hours * (self.cpu_hour_price or 0.0)

    def order(self) -> list[str]:
        return [t.name for t in self.trials]

    def predicted_time_s(self) -> dict[str, float]:
        return {t.name: t.time_s for t in self.trials}

    def to_dict(self) -> dict:
        return {"trials": [dataclasses.asdict(t) for t in self.trials],
                "nodes": [dataclasses.asdict(n) for n in self.nodes], "max_concurrent": self.max_concurrent,
                "wall_s": self.wall_s, "gpu_hours": self.gpu_hours, "cpu_hours": self.cpu_hours,
                "gpu_hour_price": self.gpu_hour_price, "cpu_hour_price": self.cpu_hour_price,
                "cost": self.cost, "notes": list(self.notes), "trial_start_s": TRIAL_START_S}

    @classmethod
    def from_dict(cls, d: dict) -> "StudyEstimate":
        return cls([TrialEstimate(**t) for t in d["trials"]], [Node(**n) for n in d["nodes"]],
                   d["max_concurrent"], d["wall_s"], d["gpu_hours"], d["cpu_hours"], d.get("gpu_hour_price"),
                   d.get("cpu_hour_price"), tuple(d.get("notes", ())))

    def lines(self) -> list[str]:
        out = [f"[estimate] {'trial':<40} {'per epoch':>10} {'epochs':>6} {'trial':>10}  source"]
        for t in self.trials:
            out.append(f"[estimate] {t.name:<40} {fmt_s(t.epoch_s):>10} {t.epochs:>6} {fmt_s(t.time_s):>10}  "
                       + ("measured" if t.source.startswith("measured") else "ASSUMED"))
        sources = sorted({t.source for t in self.trials})
        for s in sources:
            out.append(f"[estimate]   {s}")
        where = (", ".join(f"{n.cpus:g} CPU/{n.gpus} GPU" for n in self.nodes) if self.nodes
                 else "resources unknown before joining: every trial at once")
        out.append(f"[estimate] study: {self.gpu_hours:.3g} GPU-hours, {self.cpu_hours:.3g} CPU-hours; "
                   f"predicted wall time {fmt_s(self.wall_s)} on {where}"
                   + (f"; cost {self.cost:.2f} at {self.gpu_hour_price or 0:g}/GPU-hour and "
                      f"{self.cpu_hour_price or 0:g}/CPU-hour" if self.cost is not None else ""))
        out += [f"[estimate] note: {n}" for n in self.notes]
        return out


def study(estimates: list[TrialEstimate], nodes: list[Node], max_concurrent: int = 0,
          gpu_hour_price: float | None = None, cpu_hour_price: float | None = None,
          notes: tuple = (), longest_first: bool = True) -> StudyEstimate:
    """The study's estimate: trials ordered longest first (Tune starts them in that order, so the longest do not
    end up alone at the end; else in the given order), packed into `nodes` ([]: all at once)."""
    todo = [e for e in estimates if e.epochs > 0]
    if longest_first:
        todo.sort(key=lambda e: -e.wall_s)
    jobs = [(e.name, e.cpu, e.gpu, e.wall_s) for e in todo]
    wall = makespan(simulate(jobs, nodes, max_concurrent)) if nodes else max((j[3] for j in jobs), default=0.0)
    return StudyEstimate(todo, list(nodes), max_concurrent, wall,
                         sum(e.wall_s * e.gpu for e in todo) / 3600, sum(e.wall_s * e.cpu for e in todo) / 3600,
                         gpu_hour_price, cpu_hour_price, tuple(notes))


def fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def write(est: StudyEstimate, run_dir: Path, **extra) -> None:
    path = Path(run_dir) / ESTIMATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**est.to_dict(), **extra}, indent=1))
    os.replace(tmp, path)


def read(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / ESTIMATE_FILE).read_text())
    except (OSError, ValueError):
        return None


# --- progress ---------------------------------------------------------------------------------------------

def eta(est: dict, epochs, running: set[str], now: float | None = None) -> tuple[dict[str, float], float]:
    """(seconds left per trial, seconds left for the study), from the estimate (`estimate.json`'s dict) corrected
    by the epochs measured so far (`epochs`: epochs.parquet's rows). A trial with measured epochs goes on at its
    own measured pace; one without at its predicted pace times the measured/predicted ratio of the others. The
    study's time left packs what is left as `simulate` does, running trials first."""
    now = time.time() if now is None else now
    trials = {t["name"]: t for t in est["trials"]}
    measured, ratios = {}, []
    if len(epochs):
        ep = epochs[epochs.trial.isin(list(trials))]
        for name, g in ep.groupby("trial"):
            # the epoch's own time, without its one-offs (already paid): training + evaluation
            per = float((g.train_time_s + g.eval_time_s.fillna(0.0)).mean())
            measured[name] = (per, int(g.epoch.max()), bool(g.status.iloc[-1] not in ("running",)))
            if trials[name]["epoch_s"] > 0:
                ratios.append(per / trials[name]["epoch_s"])
    ratio = sum(ratios) / len(ratios) if ratios else 1.0
    left = {}
    for name, t in trials.items():
        total = t.get("done", 0) + t["epochs"]
        if name in measured:
            per, last, ended = measured[name]
            left[name] = 0.0 if ended else max(0, total - last) * per
        else:
            left[name] = t["once_s"] * ratio + t["epochs"] * t["epoch_s"] * ratio + est.get("trial_start_s", 0)
    nodes = [Node(**n) for n in est["nodes"]]
    jobs = sorted([(n, trials[n]["cpu"], trials[n]["gpu"], left[n]) for n in left if left[n] > 0],
                  key=lambda j: j[0] not in running)  # stable: keeps Tune's order within each group
    if not jobs:
        return left, 0.0
    if not nodes:
        return left, max(j[3] for j in jobs)
    return left, makespan(simulate(jobs, nodes, est.get("max_concurrent", 0), now), now)


# --- a run's estimate ---------------------------------------------------------------------------------------

def epochs_done(run_dir: Path) -> dict[str, int]:
    """Epochs each trial of a run folder has finished (a resumed run estimates only the rest)."""
    import pandas as pd
    path = Path(run_dir) / "epochs.parquet"
    if not path.exists():
        return {}
    ep = pd.read_parquet(path, columns=["trial", "epoch"])
    return {str(k): int(v) for k, v in ep.groupby("trial").epoch.max().items()}


def trial_status(run_dir: Path) -> dict[str, str]:
    import pandas as pd
    path = Path(run_dir) / "trials.parquet"
    if not path.exists():
        return {}
    t = pd.read_parquet(path, columns=["trial", "status"])
    return dict(zip(t.trial, t.status))


def for_run(specs: list[TrialSpec], resources: dict, nodes: list[Node] | None, cluster: bool,
            max_concurrent: int = 0, run_dir: Path | None = None, recalibrate: bool = False,
            gpu_hour_price: float | None = None, cpu_hour_price: float | None = None, longest_first: bool = True,
            log=print) -> StudyEstimate:
    """The estimate of a run: its trials (`specs`, `resources` by name), timed on this machine's devices for a
    local run, assumed from FLOPs on a cluster (the driver's machine is not the workers'). `nodes`: the
    resources the trials are packed into (None: unknown). With `run_dir` of a resumed run, only the epochs left.
    `longest_first=False` keeps the trials' order (a scheduler whose decisions depend on it: ASHA)."""
    import torch
    done = epochs_done(run_dir) if run_dir is not None else {}
    status = trial_status(run_dir) if run_dir is not None else {}
    specs = [s for s in specs if status.get(s.name) not in ("ok", "stopped-early", "diverged")]
    cuda = torch.cuda.is_available()
    device_of, threads_of = {}, {}
    for s in specs:
        gpu = resources[s.name]["gpu"] > 0
        device = "cuda" if gpu and cuda else "cpu"
        device_of[s.name] = f"assumed-{'cuda' if gpu else 'cpu'}" if cluster else device
        threads_of[s.name] = max(1, int(resources[s.name]["cpu"]))
    notes = []
    if cluster:
        notes.append("on a cluster the workers' devices cannot be timed from the driver: " + ASSUMPTION)
    if not cluster and any(resources[s.name]["gpu"] > 0 for s in specs) and not cuda:
        notes.append("no CUDA device here: trials with a GPU share train on CPU, and are timed on CPU")
    if done:
        notes.append(f"resumed: {sum(done.values())} finished epoch(s) are not estimated again")
    t = timings(specs, device_of, threads_of, recalibrate=recalibrate, log=log)
    est = [trial_estimate(s, t[s.name], resources[s.name], done.get(s.name, 0)) for s in specs]
    return dataclasses.replace(study(est, nodes or [], max_concurrent, gpu_hour_price, cpu_hour_price,
                                     tuple(notes), longest_first), recalibrate=recalibrate)


CLUSTER_CALIBRATION_TIMEOUT_S = 600.0  # a GPU node the autoscaler has to start takes minutes; then: assumed


def _timings_task(spec_dicts: list[dict], threads: int, recalibrate: bool) -> dict:
    """On a cluster's worker, with the resources of the trials it times: their Timings, cached on that node."""
    import ray
    import torch
    specs = [TrialSpec.from_dict(d) for d in spec_dicts]
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    t = timings(specs, {s.name: device for s in specs}, {s.name: threads for s in specs}, recalibrate,
                log=lambda m: None)
    return {n: dataclasses.asdict(v) for n, v in t.items()}


def on_cluster(est: StudyEstimate, specs: list[TrialSpec], resources: dict, nodes: list[Node] | None,
               timeout_s: float = CLUSTER_CALIBRATION_TIMEOUT_S, log=print) -> StudyEstimate:
    """The estimate again, now that the driver has joined the cluster: each group of trials with the same
    resources is calibrated by one Ray task asking for those resources (so it runs on a node of the kind the
    trials will get), one group after another (two at once would slow each other); `nodes`: the cluster's, or
    None where an autoscaler may add more. A group not timed within `timeout_s` keeps its FLOPs assumption, and so
    does one that a cluster without an autoscaler has no room for now (its trials will wait for room too: the
    calibration must not wait before them)."""
    import ray
    todo = {t.name: t for t in est.trials}
    groups: dict = {}
    for s in specs:
        if s.name in todo:
            groups.setdefault((float(resources[s.name]["cpu"]), float(resources[s.name]["gpu"])), []).append(s)
    timed, deadline = {}, time.time() + timeout_s
    task = ray.remote(_timings_task)
    for (cpu, gpu), group in groups.items():
        free = ray.available_resources()
        if nodes is not None and (free.get("CPU", 0) + EPS < cpu or free.get("GPU", 0) + EPS < gpu):
            log(f"[estimate] no room for {cpu:g} CPU / {gpu:g} GPU on the cluster now: {len(group)} trial(s) "
                "stay assumed")
            continue
        log(f"[estimate] calibrating {len(group)} trial(s) on the cluster with {cpu:g} CPU / {gpu:g} GPU")
        ref = task.options(num_cpus=cpu, num_gpus=gpu).remote([s.to_dict() for s in group], max(1, int(cpu)),
                                                              est.recalibrate)
        ready, _ = ray.wait([ref], timeout=max(1.0, deadline - time.time()))
        if not ready:
            ray.cancel(ref, force=True)
            log(f"[estimate] the cluster did not time them within {timeout_s:g} s: their figures stay assumed")
            continue
        try:
            timed.update({n: Timing(**t) for n, t in ray.get(ref).items()})
        except Exception as e:  # the trials will fail the same way and say so; the estimate stays assumed
            log(f"[estimate] calibration on the cluster failed ({type(e).__name__}: {e}); figures stay assumed")
    trials = [trial_estimate(s, timed[s.name], resources[s.name], todo[s.name].done) if s.name in timed
              else todo[s.name] for s in specs if s.name in todo]
    notes = [n for n in est.notes if not n.startswith("on a cluster")]
    gpu_price, cpu_price = est.gpu_hour_price, est.cpu_hour_price
    if gpu_price is None and cpu_price is None:  # the flags win; else the node types' labels (cluster.yaml)
        try:
            gpu_price, cpu_price = prices_from_nodes(ray.nodes())
        except argparse.ArgumentTypeError as e:
            log(f"[estimate] warning: a node's {PRICE_LABEL} label is not a price ({e}); no cost")
        if gpu_price is not None or cpu_price is not None:
            notes.append(f"prices from the nodes' {PRICE_LABEL} labels")
    if any(t.source == ASSUMPTION for t in trials):
        notes.append("trials not timed on the cluster: " + ASSUMPTION)
    if nodes is None:
        notes.append("an autoscaler may start nodes: the wall time assumes every trial runs at once")
    return dataclasses.replace(study(trials, nodes or [], est.max_concurrent, gpu_price, cpu_price, tuple(notes),
                                     longest_first=False), recalibrate=est.recalibrate)  # est's order stays


def ray_nodes() -> list[Node]:
    """The resources of the alive nodes of the Ray this driver is connected to."""
    import ray
    return [Node(float(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def start_order(entries: list[dict], est: StudyEstimate | None) -> list[dict]:
    """The grid's param entries in the estimate's order (longest first): Tune starts grid_search trials in the
    order of the list. Entries the estimate does not cover keep their order, after it."""
    if est is None:
        return entries
    rank = {n: i for i, n in enumerate(est.order())}
    return sorted(entries, key=lambda e: rank.get(e["name"], len(rank)))


def record_actual(run_dir: Path, actual_wall_s: float) -> str | None:
    """Put the run's measured wall time (Tune's fit) beside the prediction in estimate.json; the line saying both."""
    d = read(run_dir)
    if d is None:
        return None
    d["actual_wall_s"] = actual_wall_s
    path = Path(run_dir) / ESTIMATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, path)
    off = (d["wall_s"] - actual_wall_s) / actual_wall_s if actual_wall_s > 0 else math.nan
    return (f"[grid] wall time of the trials: predicted {fmt_s(d['wall_s'])}, actual {fmt_s(actual_wall_s)}"
            + (f" (prediction {100 * off:+.0f}%)" if math.isfinite(off) else ""))


class LiveView:
    """On an interactive terminal: a bar per running trial (its epochs and ETA) under a bar for the whole study
    (every epoch, the study's ETA), with the epoch lines written above them. tqdm, which transformers brings."""

    def __init__(self, file=None):
        from tqdm import tqdm
        self._tqdm, self.file = tqdm, file or sys.stdout
        self.total, self.bars = None, {}

    def _bar(self, desc: str, total: int, position: int):
        return self._tqdm(total=total, desc=desc, position=position, file=self.file, leave=False,
                          dynamic_ncols=True, bar_format="{desc} {bar} {n_fmt}/{total_fmt}{postfix}")

    def update(self, line: str, name: str, epoch: int, epochs: int, left: float, study_left: float,
               study_done: int, study_epochs: int, ended: bool) -> None:
        self._tqdm.write(line, file=self.file)
        if self.total is None:
            self.total = self._bar("study", study_epochs, 0)
        self.total.total, self.total.n = study_epochs, study_done
        self.total.set_postfix_str(f"ETA {fmt_s(study_left)}", refresh=True)
        if ended:
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()
            return
        if name not in self.bars:
            used = {b.pos for b in self.bars.values()}
            self.bars[name] = self._bar(name, epochs, next(p for p in range(1, len(used) + 2) if p not in used))
        bar = self.bars[name]
        bar.n = epoch
        bar.set_postfix_str(f"ETA {fmt_s(left)}", refresh=True)

    def close(self) -> None:
        for bar in [*self.bars.values(), self.total]:
            if bar is not None:
                bar.close()
        self.bars, self.total = {}, None


_views: dict = {}  # one LiveView per run folder, kept out of the Tune callback (Tune pickles that)


def show_epoch(line: str, run_dir: Path, name: str, epoch: int, epochs: int, est: dict | None, epochs_df,
               running: set[str], ended: bool, tty: bool | None = None) -> None:
    """An epoch's line with the trial's and the study's ETA: a plain line where the output is not a terminal (CI,
    `ray job submit`, a log file), the live view where it is."""
    tty = sys.stdout.isatty() if tty is None else tty
    if est is None or name not in {t["name"] for t in est["trials"]}:
        print(line, flush=True)
        return
    left, study_left = eta(est, epochs_df, running)
    if not tty:
        print(f"{line}  ETA trial {fmt_s(left[name])}, study {fmt_s(study_left)}", flush=True)
        return
    names = {t["name"] for t in est["trials"]}
    view = _views.setdefault(str(run_dir), LiveView())
    view.update(line, name, epoch, epochs, left[name], study_left,
                int(epochs_df.trial.isin(names).sum()), sum(t["done"] + t["epochs"] for t in est["trials"]), ended)
    if study_left == 0:
        view.close()
        _views.pop(str(run_dir), None)
