"""`python -m raybench.gpucheck`: what raybench does on a GPU, checked and measured in one call, within a time
budget, for the first time a GPU is at hand (`bash scripts/gpu-check.sh` sets up .venv, then runs this).

    python -m raybench.gpucheck                  # everything, about 8 minutes on one H100/H200
    python -m raybench.gpucheck --quick          # the cuda tests and one model of each family, about 3 minutes
    python -m raybench.gpucheck --parts study --study-only 'swin-*'

Parts, each in its own process with its own time budget; one that fails or runs out of time is a row with its
error, and the rest still run:

- `tests`: `pytest -m cuda` (tests/test_cuda.py), passed/failed/skipped counted from its JUnit XML;
- `bench`: `python -m raybench.bench` per model (reference, reference-bf16, raybench and, in the full check,
  raybench-compile rows) on CIFAR-100-shaped synthetic images;
- `study`: one epoch of every trial of the `seed` experiment alone on the GPU (synthetic data of CIFAR-100's
  size, random weights where pretrained ones would need a download): epoch time, images/s, measured peak memory
  against the estimate the grid sizes GPU shares with, and the GPU's busy fraction (NVML, else nvidia-smi)
  during the training steps: the figures FULL_GPU_STEP_FLOPS (raybench/sizing.py) is to be calibrated from;
- `grid`: `python -m raybench.grid --experiment smoke --gpus 1`: trials packed by their fractions, on CUDA.

It writes report.md and report.json (and each part's log under logs/) into `--out` and prints the report's path
as its last line. `--device cpu` runs the same parts on CPU at tiny sizes: how the test suite checks the driver
on a machine without a GPU (the cuda tests then count as skipped).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PARTS = ("tests", "bench", "study", "grid")
OK, FAILED, TIMED_OUT = "ok", "failed", "timed out"  # a part's; a trial's statuses are raybench.records'
REPO = Path(__file__).resolve().parent.parent

# ViT p8-e256-l4-h2-m2 and p4-e512-l8-h4-m4 are the seed experiment's smallest and largest ViTs.
FULL_MODELS = ("vit-p8-e256-l4-h2-m2", "vit-p4-e512-l8-h4-m4", "resnet18-cifar", "swin-tiny-ft")
QUICK_MODELS = ("vit-p8-e256-l4-h2-m2", "resnet18-cifar", "swin-tiny-ft")  # one of each family
CPU_MODELS = ("vit-p8-e32-l1-h2-m2",)

# Seconds per part on one H100/H200, chosen so the full check stays within 8 minutes (480 s) and --quick
# within 3 (180 s); a bench model is a part of its own (`bench:<model>`), so a slow one costs only its rows. The
# full bench's compiled rows cost most: a cold inductor compile of the model's forward and backward (Swin's
# cached fine-tune compiles only its head). Not yet measured on a GPU: the first run's part times say how much
# room each has; stretch them all with --time-scale.
FULL_BUDGET_S = {"tests": 120, "study": 110, "grid": 50, "bench": 50}
FULL_BENCH_S = {"vit-p8-e256-l4-h2-m2": 40, "vit-p4-e512-l8-h4-m4": 60, "resnet18-cifar": 60, "swin-tiny-ft": 40}
QUICK_BUDGET_S = {"tests": 135, "bench": 15}
CPU_BUDGET_S = {"tests": 120, "bench": 120, "study": 240, "grid": 240}  # a loaded 2-core machine, tiny sizes


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one check runs: the parts, their sizes and their time budgets."""
    device: str  # cuda or cpu
    quick: bool
    parts: tuple[str, ...]
    budgets_s: dict  # part -> seconds; the bench's per model, as bench:<model>
    bench_models: tuple[str, ...]
    bench_images: int
    bench_repeats: int
    bench_compile: bool
    study_experiment: str
    study_only: str | None
    study_images: int
    grid_experiment: str
    precision: str | None  # None: each tool's default


def make_plan(args) -> Plan:
    from raybench.data import CIFAR_TRAIN
    cuda = args.device == "cuda"
    quick = args.quick
    parts = tuple(args.parts.split(",")) if args.parts else (("tests", "bench") if quick else PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"--parts={args.parts!r}: unknown part(s) {unknown}; accepted: {', '.join(PARTS)}")
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        raise ValueError(f"--time-scale={args.time_scale:g}: must be a finite number > 0")
    models = [m.strip() for m in (args.bench_models.split(",") if args.bench_models else (
        CPU_MODELS if not cuda else (QUICK_MODELS if quick else FULL_MODELS))) if m.strip()]
    study = args.study_experiment or ("seed" if cuda else "smoke")
    check_names(parts, models, study, args.study_only, args.grid_experiment)
    budgets = CPU_BUDGET_S if not cuda else (QUICK_BUDGET_S if quick else FULL_BUDGET_S)
    budgets = {p: budgets.get(p, FULL_BUDGET_S[p]) for p in PARTS}  # --quick --parts may add full parts
    full = cuda and not quick
    budgets.update({f"bench:{m}": FULL_BENCH_S.get(m, budgets["bench"]) if full else budgets["bench"] for m in models})
    budgets = {p: s * args.time_scale for p, s in budgets.items()}
    images = args.study_images or (CIFAR_TRAIN if cuda else 256)
    return Plan(device=args.device, quick=quick, parts=parts, budgets_s=budgets,
                bench_models=tuple(models),
                bench_images=args.bench_images or ((2_000 if quick else 5_000) if cuda else 128),
                bench_repeats=2 if full else 1, bench_compile=full,
                study_experiment=study,
                study_only=args.study_only, study_images=images, grid_experiment=args.grid_experiment,
                precision=args.precision)


def check_names(parts: tuple[str, ...], models: list[str], study: str, study_only: str | None, grid: str) -> None:
    """Model names and experiments the parts would only reach minutes in, refused now (ValueError)."""
    from raybench.configs import ConfigError, parse_model_name
    from raybench.experiments import ExperimentError, load_experiment
    from raybench.plan import select
    try:
        if "bench" in parts:
            from raybench.models import check_model
            for m in models:
                check_model(parse_model_name(m))
        if "study" in parts:
            select(load_experiment(study, dataset="synthetic"), study_only)
        if "grid" in parts:
            load_experiment(grid)
    except (ConfigError, ExperimentError, FileNotFoundError) as e:
        raise ValueError(str(e)) from None


# --- precision: the one place that knows the trainer's setting (issue 12, item 3) ---------------------------

def precision_args(precision: str | None) -> list[str]:
    """`--precision P` for raybench.bench and raybench.grid once they take it; none leaves their default."""
    return [] if precision is None else ["--precision", precision]


def with_precision(spec, precision: str | None):
    return spec if precision is None else dataclasses.replace(spec, precision=precision)


def precision_of(rec: dict, device: str) -> str:
    """The precision a trial trained in: its epoch record's, where the trainer records it; else the trainer's
    rule before it became a setting (bf16 autocast on CUDA, fp32 elsewhere)."""
    return rec.get("precision") or ("bf16-autocast" if device.startswith("cuda") else "fp32")


def memory_estimate(spec) -> int:
    """The GPU memory estimate the grid sizes shares with (the one import of it here: it may move modules)."""
    from raybench.sizing import trial_memory_bytes
    return trial_memory_bytes(spec)


def precisions_used(report: dict, device: str) -> list[str]:
    """For the caveats: what the study's trials trained in, else what the trainer's rule picks here."""
    return sorted({r["precision"] for r in report["study"] if r.get("precision")}) or [precision_of({}, device)]


# --- running a part ---------------------------------------------------------------------------------------

def run_part(name: str, cmd: list[str], budget_s: float, logs: Path) -> dict:
    """Run `cmd` in its own process group with a time limit; its output goes to logs/<name>.log. On timeout the
    group gets SIGINT (Ray and Tune shut down cleanly on it), then SIGKILL."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / (name.replace(":", "-").replace("/", "-") + ".log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.setdefault("HF_HUB_OFFLINE", "1")  # timed models use random weights: nothing to download
    print(f"[gpu-check] {name}: {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)} "
          f"(budget {budget_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=budget_s)
            status = OK if rc == 0 else FAILED
        except subprocess.TimeoutExpired:
            rc, status = None, TIMED_OUT
            _stop_group(p)
    seconds = time.perf_counter() - t0
    row = {"part": name, "status": status, "seconds": round(seconds, 1), "budget_s": round(budget_s, 1),
           "returncode": rc, "command": " ".join(["python"] + cmd[1:] if cmd[0] == sys.executable else cmd),
           "log": str(log), "error": ""}
    if status == TIMED_OUT:
        row["error"] = f"timed out after {budget_s:.0f} s; last output: {last_line(log)}"
    elif status == FAILED:
        row["error"] = f"exit status {rc}: {last_line(log)}"
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s" + (f": {row['error']}" if row["error"] else ""),
          flush=True)
    return row


def _stop_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(log: Path, limit: int = 400) -> str:
    """The last line of a log that says something (an error's own line rather than a blank or a bare frame)."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    for l in reversed(lines):
        if not l.startswith(("File ", "^", "~")):
            return l[:limit]
    return ""


def broken(name: str, why: str) -> dict:
    """The row of a part whose output the driver could not read."""
    return {"part": name, "status": FAILED, "seconds": 0.0, "budget_s": 0.0, "returncode": None, "command": "",
            "log": "", "error": why}


# --- the parts --------------------------------------------------------------------------------------------

def part_tests(plan: Plan, out: Path) -> tuple[list[dict], dict]:
    xml = out / "tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    row = run_part("tests", cmd, plan.budgets_s["tests"], out / "logs")
    counts = junit_counts(xml) if xml.exists() else {}
    if counts.get("failed") or counts.get("errors"):
        row["status"] = FAILED
        row["error"] = "; ".join(f"{t}: {m}" for t, m in counts["failures"])[:1000]
    elif row["status"] == OK and not counts.get("tests"):
        row["status"], row["error"] = FAILED, "pytest collected no cuda test"
    return [row], counts


def junit_counts(xml: Path) -> dict:
    """passed/failed/errors/skipped and the failing tests' first message lines, from pytest's JUnit XML."""
    root = ET.parse(xml).getroot()
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = case.get("name", "")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed" if bad.tag == "failure" else "errors"] += 1
            out["failures"].append((name, (bad.get("message") or "").splitlines()[0][:300] if bad.get("message")
                                    else ""))
        elif skip is not None:
            out["skipped"] += 1
            out["skip_reasons"].append(skip.get("message", ""))
        else:
            out["passed"] += 1
    out["skip_reasons"] = sorted(set(out["skip_reasons"]))
    return out


def part_bench(plan: Plan, out: Path) -> tuple[list[dict], list[dict]]:
    """One bench process per model, so a model that fails or runs out of time costs only its own rows."""
    rows, summary = [], []
    for model in plan.bench_models:
        d = out / "bench" / model
        shutil.rmtree(d, ignore_errors=True)
        cmd = [sys.executable, "-m", "raybench.bench", "--device", plan.device, "--models", model, "--images",
               str(plan.bench_images), "--repeats", str(plan.bench_repeats), "--warmup-batches", "2",
               "--out", str(d), *(["--compile"] if plan.bench_compile else []), *precision_args(plan.precision)]
        row = run_part(f"bench:{model}", cmd, plan.budgets_s[f"bench:{model}"], out / "logs")
        if (d / "bench.json").exists():
            result = json.loads((d / "bench.json").read_text())
            summary += result["summary"]
            errors = [f"{r['loop'] or 'setup'}: {r['error']}" for r in result["rows"] if r["error"]]
            if errors:
                row["status"], row["error"] = FAILED, "; ".join(errors)[:1000]
        rows.append(row)
    return rows, summary


def part_study(plan: Plan, out: Path) -> tuple[list[dict], list[dict]]:
    rows_file = out / "study.jsonl"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "raybench.gpucheck", "--study-worker", str(rows_file), "--device", plan.device,
           "--study-experiment", plan.study_experiment, "--study-images", str(plan.study_images),
           *(["--study-only", plan.study_only] if plan.study_only else []),
           *(["--precision", plan.precision] if plan.precision else [])]
    row = run_part("study", cmd, plan.budgets_s["study"], out / "logs")
    trials = [json.loads(l) for l in rows_file.read_text().splitlines()] if rows_file.exists() else []
    errors = [f"{t['trial']}: {t['error']}" for t in trials if t["error"]]
    if errors and row["status"] == OK:
        row["status"], row["error"] = FAILED, "; ".join(errors)[:1000]
    elif row["status"] == TIMED_OUT:
        row["error"] += f" ({len(trials)} trial(s) done before)"
    return [row], trials


def part_grid(plan: Plan, out: Path) -> tuple[list[dict], dict]:
    results = out / "grid"
    shutil.rmtree(results, ignore_errors=True)
    # One GPU on CUDA; on a machine without one the same flag is a scheduling dry run on a logical GPU.
    cmd = [sys.executable, "-m", "raybench.grid", "--experiment", plan.grid_experiment, "--gpus", "1",
           "--no-dashboard", "--no-analysis", "--results-dir", str(results), "--name", "grid",
           *precision_args(plan.precision)]
    row = run_part("grid", cmd, plan.budgets_s["grid"], out / "logs")
    run_dir = results / "grid"
    if not (run_dir / "epochs.parquet").exists():
        return [row], {}
    import torch
    grid = grid_figures(run_dir, torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu")
    problems = [k for k, ok in grid["checks"].items() if not ok]
    if problems and row["status"] == OK:
        row["status"], row["error"] = FAILED, "checks failed: " + ", ".join(problems)
    return [row], grid


def grid_figures(run_dir: Path, device: str) -> dict:
    """What a finished grid run says about packing: trials at once, fractions, devices (`device`: the name every
    epoch row should carry, cpu or the GPU's), peak memory against each trial's estimate."""
    import pandas as pd
    from raybench import records
    from raybench.configs import TrialSpec
    ep, tr = pd.read_parquet(run_dir / "epochs.parquet"), pd.read_parquet(run_dir / "trials.parquet")
    record = json.loads((run_dir / "experiment.json").read_text())
    spans = ep.groupby("trial").agg(start=("started_at", "min"), end=("finished_at", "max"),
                                    gpu=("gpu_ids", "first"), peak_mb=("peak_memory_mb", "max"))
    at_once = max_at_once([(s.start, s.end) for s in spans.itertuples()]) if len(spans) else 0
    trials = []
    for t in tr.itertuples():
        spec = TrialSpec.from_dict(record["trials"][t.trial]["spec"])
        peak = float(spans.peak_mb.get(t.trial, float("nan")))
        est = memory_estimate(spec) / 2**20
        trials.append({"trial": t.trial, "status": t.status, "gpu_fraction": float(t.gpu_fraction),
                       "device": t.device, "epochs": int((ep.trial == t.trial).sum()), "peak_memory_mb": peak,
                       "estimate_mb": est, "peak_over_estimate": peak / est if est else None})
    checks = {"every trial ok": bool((tr.status == records.OK).all()),
              f"every epoch row on {device}": bool((ep.device == device).all()),
              "trials overlapped on one GPU": at_once >= 2}
    return {"run_dir": str(run_dir), "trials": trials, "max_trials_at_once": at_once,
            "fractions": sorted(float(f) for f in tr.gpu_fraction), "checks": checks,
            "epochs_window_s": float(ep.finished_at.max() - ep.started_at.min())}


def max_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an interval ending as another starts does not overlap it)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


# --- the study worker (a process of its own, started by part_study) ----------------------------------------

class BusySampler:
    """The GPU's busy fraction over a stretch of time: NVML's utilisation (the share of its last sample period,
    1/6 to 1 s, in which any kernel ran) polled from a thread; nvidia-smi where NVML cannot be loaded. Device 0
    of NVML: the check runs on one GPU."""

    def __init__(self, interval_s: float = 0.05):
        self.read, self.source, self.why = busy_reader()
        self.interval_s = interval_s if self.source == "nvml" else max(interval_s, 0.2)  # nvidia-smi is a process
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.read:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), float(self.read())))
            except Exception as e:  # a reading that fails once fails again: stop, and say why
                self.why = f"{self.source} reading failed: {type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


def busy_reader():
    """(read() -> percent, source, why-not)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return (lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), "nvml", ""
    except Exception as e:  # not installed, or no NVIDIA driver
        why = f"NVML unavailable ({type(e).__name__}: {e})"
    smi = shutil.which("nvidia-smi")
    if smi:
        def read():
            r = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True, timeout=5)
            return float(r.stdout.split()[0])
        return read, "nvidia-smi", ""
    return None, "", why + "; no nvidia-smi on PATH"


def busy_fraction(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Mean busy fraction (0-1) of the samples taken in (start, end]; None when none fell there."""
    inside = [pct for t, pct in samples if start < t <= end]
    return sum(inside) / len(inside) / 100 if inside else None


def study_row(trial_name: str, spec, rec: dict, sampler: BusySampler, device: str, reserved_mb: float) -> dict:
    from raybench.records import ERROR
    from raybench.sizing import CACHE_ON, FULL_GPU_STEP_FLOPS, gpu_fraction, step_flops
    est_mb = memory_estimate(spec) / 2**20
    row = {"trial": trial_name, "model": spec.model.name, "family": spec.model.family,
           "batch_size": spec.recipe.batch_size, "images": spec.data.train_size, "device": rec.get("device", device),
           "precision": precision_of(rec, device), "estimate_mb": est_mb, "rule_gpu_fraction": gpu_fraction(spec),
           "busy_source": sampler.source, "note": "", "error": rec.get("error", "")}
    if "train_time_s" not in rec:
        return {**row, "status": rec.get("status", ERROR)}
    steps = -(-spec.data.train_size // spec.recipe.batch_size)
    flops = step_flops(spec)
    # The training steps' window: the record's epoch ends with its evaluation, which came after them.
    train_end = rec["finished_at"] - rec["eval_time_s"]
    busy = busy_fraction(sampler.samples, train_end - rec["train_time_s"], train_end)
    achieved = flops * steps / rec["train_time_s"]
    cached = rec.get("feature_cache") == CACHE_ON
    row.update(status=rec["status"], epoch_time_s=rec["train_time_s"], images_per_s=rec["images_per_s"],
               eval_time_s=rec["eval_time_s"], feature_pass_s=rec.get("cache_time_s", 0.0),
               peak_memory_mb=rec["peak_memory_mb"], peak_reserved_mb=reserved_mb,
               peak_over_estimate=rec["peak_memory_mb"] / est_mb if est_mb else None, busy_fraction=busy,
               step_gflops=flops / 1e9, rule_compute_share=flops / FULL_GPU_STEP_FLOPS,
               achieved_tflops=None if cached else achieved / 1e12,
               implied_full_gpu_step_flops=None if cached or not busy else flops / busy)
    if cached:
        row["note"] = ("features cached: its steps train the head alone, so the rule's step FLOPs (one backbone "
                       "forward per image) are not what ran; feature pass timed apart")
    elif busy is None:
        row["note"] = sampler.why or "no busy sample inside the training steps (epoch shorter than NVML's period)"
    return row


def study_worker(rows_file: Path, device: str, experiment: str, only: str | None, images: int,
                 precision: str | None) -> int:
    """One epoch of each trial, one after another in this process (the data is made once), a JSON line each
    as it ends, so a part stopped at its budget keeps what it measured."""
    import torch
    from transformers.utils import logging as hf_logging
    from raybench.bench import bench_spec
    from raybench.data import CIFAR_TEST, CIFAR_TRAIN, synthetic
    from raybench.experiments import load_experiment
    from raybench.plan import select
    from raybench.records import ERROR
    from raybench.train import Trial
    hf_logging.set_verbosity_error()
    test_images = max(1, images * CIFAR_TEST // CIFAR_TRAIN)
    exp = select(load_experiment(experiment, dataset="synthetic", train_size=images, test_size=test_images), only)
    data = synthetic(images, test_images, num_classes=exp.trials[0].model.num_classes)
    print(f"[study] {len(exp.trials)} trials of {exp.name}, {images}/{test_images} synthetic images, {device}",
          flush=True)
    if device.startswith("cuda"):  # cuBLAS and cuDNN start up on their first call: not in a trial's epoch
        x = torch.randn(8, 3, 32, 32, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.nn.functional.conv2d(x, torch.randn(8, 3, 3, 3, device=device)).flatten(1).matmul(
                torch.randn(8 * 30 * 30, 8, device=device)).sum().item()
    sampler = BusySampler() if device.startswith("cuda") else None
    with (sampler or _NoSampler()) as s:
        for t in exp.trials:
            spec = trial = rec = None
            try:
                spec = with_precision(bench_spec(t, images, test_images, None), precision)
                trial = Trial(spec, device=device, dataset=data)
                rec = next(trial.epochs())
                reserved = torch.cuda.max_memory_reserved() / 2**20 if device.startswith("cuda") else float("nan")
                row = study_row(t.name, spec, rec, s, device, reserved)
            except Exception as e:  # this trial is a row with its error; the next one still runs
                row = {"trial": t.name, "model": t.model.name, "family": t.model.family, "status": ERROR,
                       "device": device, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            trial = rec = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            print(f"[study] {t.name}: " + (row["error"] or f"{row['epoch_time_s']:.2f} s, "
                                           f"{row['images_per_s']:,.0f} img/s"), flush=True)
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


class _NoSampler:
    source, why, samples = "", "no GPU: busy fraction not measured", []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# --- the report -------------------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}") -> str:
    return "" if x is None or x != x else fmt.format(x)


def markdown(report: dict) -> str:
    m, plan = report["machine"], report["plan"]
    lines = [f"# raybench GPU check, {m['date_utc']}", "",
             f"- command: `{report['command']}` ({'quick' if plan['quick'] else 'full'} check on {plan['device']}: "
             f"{', '.join(plan['parts'])})",
             f"- GPU: {m['gpu'] or 'none'}; NVIDIA driver {report['driver'] or '-'}; CPU: {m['cpu_model']}, "
             f"{m['cpus_usable']} usable CPUs",
             f"- torch {m['torch_version']} (CUDA {m['cuda_version'] or '-'}), torchvision "
             f"{m['torchvision_version']}, Python {m['python_version']}, raybench {m['git_commit'] or '(no commit)'}",
             f"- time: {report['seconds']:.0f} s for the parts (their budgets: "
             f"{sum(p['budget_s'] for p in report['parts']):.0f} s)"
             + (f", {report['setup_s']:.0f} s setting up .venv before them" if report["setup_s"] else ""), "",
             "## Parts", "", "| part | status | s | budget s | error |", "|---|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['part']} | {p['status']} | {p['seconds']:.0f} | {p['budget_s']:.0f} | "
                     f"{p['error'].replace('|', '/')} |")
    lines += ["", "Each part's output is in `logs/` beside this report.", ""]
    t = report.get("tests")
    if t:
        lines += ["## CUDA tests (`pytest -m cuda`)", "",
                  f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
                  f"of {t['tests']}." + (f" Skipped because: {'; '.join(t['skip_reasons'])}." if t['skipped'] else ""),
                  ""] + [f"- FAILED {n}: {msg}" for n, msg in t["failures"]] + [""]
    if report.get("bench"):
        lines += ["## Training throughput (`python -m raybench.bench`, synthetic CIFAR-100-shaped images)", "",
                  "| model | batch | images | loop | n | images/s median (min-max) | epoch s | compile s (cold) | "
                  "ratio to reference |", "|---|---|---|---|---|---|---|---|---|"]
        for s in report["bench"]:
            comp = _f(s["compile_cold_s"], "{:.1f}") if s["loop"] == "raybench-compile" else ""
            lines.append(f"| {s['model']} | {s['batch_size']} | {s['images']} | {s['loop']} | {s['n']} | "
                         f"{s['images_per_s_median']:,.0f} ({s['images_per_s_min']:,.0f}-"
                         f"{s['images_per_s_max']:,.0f}) | {s['epoch_time_s_median']:.2f} | {comp} | "
                         f"{_f(s['ratio_to_reference'], '{:.1f}x')} |")
        lines.append("")
    if report.get("study"):
        lines += [f"## One epoch of each `{plan['study_experiment']}` trial alone on the device "
                  f"({plan['study_images']:,} synthetic training images)", "",
                  ("Peak: the CUDA allocator's peak during the epoch (feature pass and evaluation included), "
                   "against" if plan["device"] == "cuda" else
                   "Peak: on CPU the process's peak resident memory, not comparable with")
                  + " the estimate GPU shares are sized with (`trial_memory_bytes`). Busy: NVML's GPU "
                  "utilisation during "
                  "the training steps. Rule share: step FLOPs / FULL_GPU_STEP_FLOPS; implied full-GPU step "
                  "FLOPs: step FLOPs / busy, what FULL_GPU_STEP_FLOPS would be if this trial were the yardstick.", "",
                  "| trial | batch | epoch s | images/s | peak MB | estimate MB | peak / estimate | busy | "
                  "step GFLOP | rule share | rule fraction | achieved TFLOP/s | implied full-GPU step FLOPs | "
                  "precision | note / error |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["study"]:
            lines.append(
                f"| {r['trial']} | {r.get('batch_size', '')} | {_f(r.get('epoch_time_s'))} | "
                f"{_f(r.get('images_per_s'), '{:,.0f}')} | {_f(r.get('peak_memory_mb'), '{:,.0f}')} | "
                f"{_f(r.get('estimate_mb'), '{:,.0f}')} | {_f(r.get('peak_over_estimate'))} | "
                f"{_f(r.get('busy_fraction'), '{:.0%}')} | {_f(r.get('step_gflops'), '{:,.1f}')} | "
                f"{_f(r.get('rule_compute_share'), '{:.3f}')} | {_f(r.get('rule_gpu_fraction'), '{:g}')} | "
                f"{_f(r.get('achieved_tflops'), '{:.1f}')} | {_f(r.get('implied_full_gpu_step_flops'), '{:.2e}')} | "
                f"{r.get('precision', '')} | {(r.get('error') or r.get('note', '')).replace('|', '/')} |")
        lines.append("")
    g = report.get("grid")
    if g:
        lines += [f"## Grid (`python -m raybench.grid --experiment {plan['grid_experiment']} --gpus 1`)", "",
                  f"- at most {g['max_trials_at_once']} trials at once; fractions {g['fractions']}; epochs from "
                  f"first start to last end: {g['epochs_window_s']:.1f} s",
                  *[f"- {k}: {'yes' if ok else 'NO'}" for k, ok in g["checks"].items()], "",
                  "| trial | status | GPU fraction | device | epochs | peak MB | estimate MB | peak / estimate |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t['trial']} | {t['status']} | {t['gpu_fraction']:g} | {t['device']} | {t['epochs']} | "
                  f"{_f(t['peak_memory_mb'], '{:,.0f}')} | {_f(t['estimate_mb'], '{:,.0f}')} | "
                  f"{_f(t['peak_over_estimate'])} |" for t in g["trials"]] + [""]
    lines += ["## Caveats", "",
              "- Data is synthetic (CIFAR-100's image shape: 32x32 uint8); accuracies here say nothing about "
              "CIFAR-100. Weights are random where pretrained ones would need a download (Swin, ResNet `-pt`).",
              f"- Precision: {', '.join(report['precisions']) or '-'} (raybench trials); the bench's `reference` "
              "rows are fp32, `reference-bf16` the same loop under bf16 autocast.",
              "- Busy fraction is NVML's utilisation: the share of time any kernel ran, not how much of the GPU it "
              "used; a small model's launch-bound steps read as busy. Epochs shorter than NVML's sample period "
              "(up to 1 s) have few samples.",
              "- The memory estimate is fp32 and leaves out evaluation's and the feature pass's transient "
              "activations; the peak includes them.", ""]
    return "\n".join(lines)


def nvidia_driver() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ""
    try:
        r = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# --- CLI ----------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.gpucheck", description=(
        "Check and measure raybench on a GPU in one call: the cuda tests, the bench, one epoch of each seed "
        "trial with memory and GPU busy fraction, and the smoke grid on one GPU. Writes report.md and "
        "report.json; prints the report's path last."))
    p.add_argument("--quick", action="store_true",
                   help="the cuda tests and one model of each family in the bench, about 3 minutes (default: all "
                        "parts, about 8)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default), or cpu: the same parts at tiny sizes, to check the driver without a GPU")
    p.add_argument("--parts", help=f"comma-separated parts to run, in the order given: {', '.join(PARTS)} "
                                   "(default: all, in that order; --quick: tests,bench)")
    p.add_argument("--out", default="results/gpu-check", help="output folder (default: results/gpu-check)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every part's time budget by this (default: 1)")
    p.add_argument("--precision", help="passed to the bench, the study's trials and the grid (default: theirs)")
    p.add_argument("--bench-models", help="comma-separated models for the bench (default: "
                                          f"{','.join(FULL_MODELS)}; --quick: {','.join(QUICK_MODELS)})")
    p.add_argument("--bench-images", type=int, help="training images per bench epoch (default: 5000; --quick 2000)")
    p.add_argument("--study-experiment", help="experiment whose trials the study times (default: seed; cpu: smoke)")
    p.add_argument("--study-only", help="only the study trials matching this pattern, as grid --only")
    p.add_argument("--study-images", type=int,
                   help="synthetic training images per study epoch (default: CIFAR-100's 50000; cpu: 256)")
    p.add_argument("--grid-experiment", default="smoke", help="experiment the grid part runs (default: smoke)")
    p.add_argument("--setup-s", type=float, default=0.0, help=argparse.SUPPRESS)  # from scripts/gpu-check.sh
    p.add_argument("--study-worker", metavar="ROWS_FILE", help=argparse.SUPPRESS)  # the study part's process
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    for flag in ("bench_images", "study_images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            print(f"error: --{flag.replace('_', '-')}={v}: must be >= 1", file=sys.stderr)
            return 2
    if args.study_worker:
        return study_worker(Path(args.study_worker), args.device, args.study_experiment, args.study_only,
                            args.study_images, args.precision)
    try:
        plan = make_plan(args)
        import torch
        if plan.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device here (built for CUDA "
                             f"{torch.version.cuda or 'none'}); use --device cpu to check the driver itself")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from raybench.records import machine_info
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    report = {"command": "python -m raybench.gpucheck " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "driver": nvidia_driver(), "plan": dataclasses.asdict(plan),
              "setup_s": args.setup_s, "parts": [], "tests": None, "bench": [], "study": [], "grid": None}
    t0 = time.perf_counter()
    for part in plan.parts:
        try:
            rows, data = {"tests": part_tests, "bench": part_bench, "study": part_study,
                          "grid": part_grid}[part](plan, out)
        except Exception as e:  # reading a part's output failed: that part is a row with the error
            rows, data = [broken(part, f"the check itself failed: {type(e).__name__}: {e}")], None
        report["parts"] += rows
        report[part] = data if data is not None else report[part]
    report["seconds"] = time.perf_counter() - t0
    report["precisions"] = precisions_used(report, plan.device)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    failed = [p["part"] for p in report["parts"] if p["status"] != OK]
    print(f"[gpu-check] {len(report['parts']) - len(failed)} of {len(report['parts'])} parts ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; {report['seconds']:.0f} s", flush=True)
    print(out / "report.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
