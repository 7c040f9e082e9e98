"""`python -m raybench.bench`: raybench's training loop against a plain reference loop, side by side in one run.

    python -m raybench.bench                                   # default models on CPU (and CUDA where present)
    python -m raybench.bench --device cuda --repeats 5 --compile
    python -m raybench.bench --precision fp32,bf16             # both precisions side by side, ratio in one run
    python -m raybench.bench --grid-overhead                   # + what Ray scheduling costs on the smoke grid
    python -m raybench.bench --study seed                      # CUDA: one epoch of every seed trial, CIFAR-100 size

raybench's side is `raybench.train.Trial`, the object the grid runs (device-resident uint8 data, batched
augmentation, bf16 autocast where the device computes bf16 natively (`--precision`), fused Adam on CUDA, the
frozen-backbone feature cache, optional compile). The reference is the loop the study's first numbers came
from, written the common way: a torchvision-style
dataset over the same uint8 images as a HWC numpy array, a PIL image and `ToTensor`/`Normalize` (and `Resize`
where the model needs it) per sample, a `DataLoader`, fp32, plain Adam, `loss.item()` every step. Same model,
same batch, same images. Weights are random where pretrained ones would need a download: throughput does not
depend on their values.

Every throughput is images / wall time of one timed epoch, after a warm-up of a few batches, synchronised on
CUDA; each loop runs `--repeats` times and the table gives the median with its min and max; the ratio is
raybench's median over the reference's, measured in the same process. Results: bench.json (everything),
bench.parquet (one row per timed epoch) and bench.md (the tables) in `--out`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raybench.configs import (PRECISIONS, SWIN_ARCHS, SWIN_MICRO, ConfigError, DataSpec, ModelConfig, ResNetConfig,
                              SwinConfig, TrialSpec, default_recipe, parse_model_name)
from raybench.data import CIFAR_TEST, CIFAR_TRAIN, Dataset, synthetic
from raybench.records import TIME_COLUMNS, machine_info

DEFAULT_MODELS = ("vit-p8-e256-l4-h2-m2", "resnet18-cifar", "swin-micro-ft")
STUDIES = ("seed",)
LOOP_REFERENCE, LOOP_RAYBENCH, LOOP_HEAD, LOOP_COMPILE = "reference", "raybench", "raybench-head", "raybench-compile"
LOOP_REFERENCE_AMP = "reference-bf16"
# A bench row's fields that only some loops fill: a feature pass, a compile, an error.
ROW_DEFAULTS = {"cache_time_s": 0.0, "compile_time_s": 0.0, "compile_cold_s": 0.0, "feature_cache": "", "error": ""}
LOOP_NOTES = {
    LOOP_REFERENCE: "DataLoader + per-sample PIL ToTensor/Normalize, fp32, Adam",
    LOOP_REFERENCE_AMP: "the reference loop under bf16 autocast (CUDA only): what precision alone buys, so the "
                        "rest of raybench's ratio is its data path and step",
    LOOP_RAYBENCH: "raybench Trial, first epoch; a cached trial's one-off feature pass (train + test set) included",
    LOOP_HEAD: "raybench Trial, a cached trial's head epoch alone (feature pass excluded)",
    LOOP_COMPILE: "raybench Trial with torch.compile; compile time reported apart: cold = the first Trial's "
                  "(what a grid trial, a fresh process, pays), per Trial = later Trials reusing the compiled code",
}


# --- what runs where ----------------------------------------------------------------------------------------

def timing_config(cfg: ModelConfig) -> ModelConfig:
    """The same architecture with weights that need no download (random where pretrained ones would be)."""
    if isinstance(cfg, ResNetConfig) and cfg.pretrained:
        return dataclasses.replace(cfg, pretrained=False)
    if isinstance(cfg, SwinConfig) and cfg.frozen_backbone and cfg.checkpoint in SWIN_ARCHS and cfg.checkpoint != SWIN_MICRO:
        from raybench.models.swin import random_checkpoint
        return dataclasses.replace(cfg, checkpoint=random_checkpoint(cfg.checkpoint))
    return cfg


def bench_spec(name: str | TrialSpec, images: int, test_images: int, batch_size: int | None,
               compile: bool = False, precision: str = "auto") -> TrialSpec:
    """One epoch of a model name (seed recipe) or of an experiment's trial (its own model and recipe)."""
    if isinstance(name, TrialSpec):
        cfg, recipe = timing_config(name.model), name.recipe
    else:
        cfg = timing_config(parse_model_name(name, num_classes=100))
        recipe = default_recipe("seed", cfg)
    if batch_size:
        recipe = dataclasses.replace(recipe, batch_size=batch_size)
    return TrialSpec(cfg, dataclasses.replace(recipe, epochs=1), DataSpec("synthetic", None, images, test_images),
                     compile=compile, precision=precision)


def subset(data: Dataset, n: int, n_test: int) -> Dataset:
    return dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n],
                               test_x=data.test_x[:n_test], test_y=data.test_y[:n_test])


def warm_up_sizes(n: int, n_test: int, batch_size: int, warmup_batches: int) -> tuple[int, int]:
    """Training and test images of the throwaway warm-up Trial: a few full batches and a short last one, so its
    compile covers every graph a real trial compiles (CIFAR-100's 50,000 images end on a short batch of 16 at
    batch 64). The short batch has the timed set's size where that set has one, else CIFAR-100's."""
    from raybench.sizing import EVAL_BATCH

    def size(n, batch, full_batches, short):
        k = min(full_batches, (n - short) // batch)
        return k * batch + short if k >= 1 else n  # a set too small for both shapes is taken whole

    short = n % batch_size or CIFAR_TRAIN % batch_size or batch_size // 2
    short_test = n_test % EVAL_BATCH or CIFAR_TEST % EVAL_BATCH or EVAL_BATCH // 2
    # >= 256 training images: the feature pass runs at batch 256 on CUDA
    return (size(n, batch_size, max(warmup_batches, math.ceil(256 / batch_size)), short),
            size(n_test, EVAL_BATCH, 1, short_test))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the reference loop: the common way ---------------------------------------------------------------------

class ReferenceImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does per sample: a HWC uint8 array -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        img, target = Image.fromarray(self.data[i]), self.targets[i]
        return self.transform(img), target


class ReferenceLoop:
    """Model, optimiser and DataLoader of the plain loop; `epoch()` trains over the loader once."""

    def __init__(self, spec: TrialSpec, data: Dataset, device: torch.device, workers: int, bf16: bool = False):
        from torchvision import transforms
        from raybench.models import build_model
        torch.manual_seed(spec.seed)
        self.device, self.bf16 = device, bf16
        self.model = build_model(spec.model).to(device)
        mean, std = data.mean_std
        mean, std = (self.model.mean, self.model.std) if self.model.mean is not None else (mean.tolist(), std.tolist())
        size = self.model.input_size
        tf = ([transforms.Resize((size, size))] if size != data.train_x.shape[-1] else [])
        tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        images = data.train_x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3), as CIFAR100.data
        ds = ReferenceImages(images, data.train_y.tolist(), transforms.Compose(tf))
        self.loader = torch.utils.data.DataLoader(ds, batch_size=spec.recipe.batch_size, shuffle=True,
                                                  num_workers=workers, pin_memory=device.type == "cuda")
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=spec.recipe.lr)

    def epoch(self, max_batches: int | None = None) -> tuple[int, float]:
        """(images, seconds) of one pass over the loader, or of its first `max_batches` batches."""
        self.model.train()
        sync(self.device)
        t0 = time.perf_counter()
        n, running_loss = 0, 0.0
        for i, (x, y) in enumerate(self.loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.model(x).float(), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            running_loss += loss.item()  # the usual per-step logging: one sync per step
            n += len(y)
        sync(self.device)
        return n, time.perf_counter() - t0


# --- the measurements ---------------------------------------------------------------------------------------

def raybench_epoch(spec: TrialSpec, data: Dataset, device: str, threads: int | None) -> dict:
    """One epoch of a fresh raybench Trial (building it is not timed); its record's times."""
    from raybench.train import Trial
    rec = next(Trial(spec, device=device, threads=threads, dataset=data).epochs())
    if "train_time_s" not in rec:
        raise RuntimeError(f"{rec['status']}: {rec.get('error', '')}")
    return rec


def measure_model(name: str, data: Dataset, device: str, args, repeats: int, bench: str = "throughput",
                  trial: TrialSpec | None = None) -> list[dict]:
    """Timed epochs of the reference loop and of raybench's Trial for one model (an experiment's `trial`, when
    given) on one device, raybench's at each of `args.precision`'s settings: one row each."""
    from raybench.train import resolve_precision
    dev = torch.device(device)
    n, n_test = len(data.train_y), len(data.test_y)
    spec = bench_spec(trial or name, n, n_test, args.batch_size)
    B = spec.recipe.batch_size
    workers = args.workers if args.workers is not None else (2 if dev.type == "cuda" else 0)
    threads = args.threads if dev.type == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    base = {"bench": bench, "device": device, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else "cpu", "model": name, "batch_size": B, "images": n, "threads": torch.get_num_threads()}
    rows = []

    def row(loop, repeat, seconds, precision, **extra):
        rows.append({**base, "loop": loop, "repeat": repeat, "epoch_time_s": seconds, "images_per_s": n / seconds,
                     "workers": workers if loop in (LOOP_REFERENCE, LOOP_REFERENCE_AMP) else 0,
                     "precision": precision, **ROW_DEFAULTS, **extra})

    # Reference: one DataLoader and model for all repeats, warmed on a few batches.
    ref = ReferenceLoop(spec, data, dev, workers)
    ref.epoch(max_batches=args.warmup_batches)
    ref_bf16 = ReferenceLoop(spec, data, dev, workers, bf16=True) if dev.type == "cuda" else None
    if ref_bf16:
        ref_bf16.epoch(max_batches=args.warmup_batches)
    # raybench: a throwaway Trial on a few batches warms kernels and allocators (the feature pass's batch of
    # 256 too); each repeat then times the first epoch of a fresh Trial, as the Trial itself times it.
    # Settings are resolved first, so "auto,fp32" where auto means fp32 times one variant, not two alike.
    precisions = list(dict.fromkeys(resolve_precision(p, dev) for p in args.precision.split(",")))
    variants = [(LOOP_RAYBENCH, dataclasses.replace(spec, compile=False, precision=p)) for p in precisions]
    variants += ([(LOOP_COMPILE, dataclasses.replace(spec, compile=True, precision=p)) for p in precisions]
                 if args.compile else [])
    warm = subset(data, *warm_up_sizes(n, n_test, B, args.warmup_batches))
    # The warm-up Trial compiles from a cold cache: its compile time is the one a grid trial pays (each
    # trial is a fresh process); later Trials here reuse the compiled code and pay only recompiles.
    cold = {(loop, s.precision): raybench_epoch(s, warm, device, threads)["compile_time_s"] for loop, s in variants}
    # Repeats interleave the loops, so a change in the machine's load falls on all of them alike.
    for r in range(repeats):
        seen, dt = ref.epoch()
        assert seen == n
        row(LOOP_REFERENCE, r, dt, "fp32")
        if ref_bf16:
            row(LOOP_REFERENCE_AMP, r, ref_bf16.epoch()[1], "bf16")
        for loop, s in variants:
            rec = raybench_epoch(s, data, device, threads)
            extra = dict(cache_time_s=rec["cache_time_s"], compile_time_s=rec["compile_time_s"],
                         compile_cold_s=cold[loop, s.precision], feature_cache=rec["feature_cache"])
            row(loop, r, rec["train_time_s"] + rec["cache_time_s"], rec["precision"], **extra)
            if loop == LOOP_RAYBENCH and rec["cache_time_s"] > 0:
                row(LOOP_HEAD, r, rec["train_time_s"], rec["precision"], **extra)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Median, min and max per (bench, device, model, loop, precision), the ratio to the reference's median and,
    for bf16, the ratio to the same loop's fp32 median (reference-bf16: to the reference's)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["error"]:
            groups.setdefault((r["bench"], r["device"], r["model"], r["loop"], r["precision"]), []).append(r)
    out = []
    for (bench, device, model, loop, precision), rs in groups.items():
        ips = [r["images_per_s"] for r in rs]
        out.append({"bench": bench, "device": device, "device_name": rs[0]["device_name"], "model": model,
                    "loop": loop, "precision": precision, "n": len(rs), "batch_size": rs[0]["batch_size"],
                    "images": rs[0]["images"],
                    "images_per_s_median": statistics.median(ips), "images_per_s_min": min(ips),
                    "images_per_s_max": max(ips),
                    **{f"{c}_median": statistics.median(r[c] for r in rs)
                       for c in ("epoch_time_s", "cache_time_s", "compile_time_s")},
                    "compile_cold_s": rs[0]["compile_cold_s"],
                    "feature_cache": rs[0]["feature_cache"]})
    ref = {(s["bench"], s["device"], s["model"]): s["images_per_s_median"] for s in out if s["loop"] == LOOP_REFERENCE}
    medians = {(s["bench"], s["device"], s["model"], s["loop"], s["precision"]): s["images_per_s_median"] for s in out}
    for s in out:
        base = ref.get((s["bench"], s["device"], s["model"]))
        s["ratio_to_reference"] = s["images_per_s_median"] / base if base else None
        fp32 = (medians.get((s["bench"], s["device"], s["model"],
                             LOOP_REFERENCE if s["loop"] == LOOP_REFERENCE_AMP else s["loop"], "fp32"))
                if s["precision"] == "bf16" else None)
        s["ratio_to_fp32"] = s["images_per_s_median"] / fp32 if fp32 else None
    return out


# --- the grid's own overhead --------------------------------------------------------------------------------

def grid_trial_times(run_dir: Path) -> dict:
    """What the trials of a finished grid run spent inside their epochs, from its epochs.parquet."""
    import pandas as pd
    ep = pd.read_parquet(Path(run_dir) / "epochs.parquet")

    def total(col):
        return float(ep[col].fillna(0).sum()) if col in ep else 0.0

    out = {"trials": int(ep.trial.nunique()), "epochs": len(ep), **{c: total(c) for c in TIME_COLUMNS}}
    out["trial_time_s"] = sum(out[k] for k in TIME_COLUMNS)
    out["epochs_window_s"] = float(ep.finished_at.max() - ep.started_at.min())
    cols = [c for c in TIME_COLUMNS if c in ep]
    out["per_trial_s"] = {k: float(v) for k, v in ep[cols].fillna(0).sum(axis=1).groupby(ep.trial).sum().items()}
    return out


def grid_phases(run_dir: Path) -> dict:
    """Where a grid run's wall time went: the phases it writes at the end (raybench.grid.PHASES_FILE), and from
    its epoch rows when the first epoch started and the last ended within the Tune run, and the idle seconds between
    consecutive epochs of one actor process: within a trial (report, checkpoint) and between two trials (the
    reused actor's hand-over: reset_config, building the next Trial, Tune's scheduling)."""
    import pandas as pd
    from raybench.grid import PHASES_FILE
    path = Path(run_dir) / PHASES_FILE
    if not path.exists():
        return {}
    phases = json.loads(path.read_text())
    ep = pd.read_parquet(Path(run_dir) / "epochs.parquet").sort_values(["pid", "started_at"])
    prev = ep.groupby("pid").shift(1)
    gap = ep.started_at - prev.finished_at
    same = ep.trial == prev.trial
    phases.update(
        first_epoch_after_s=float(ep.started_at.min() - phases["tune_run_started_at"]),
        after_last_epoch_s=float(phases["tune_run_ended_at"] - ep.finished_at.max()),
        actor_processes=int(ep.pid.nunique()),
        between_epochs_s=float(gap[same].sum()), between_epochs_n=int(same.sum()),
        between_trials_s=float(gap[~same & prev.trial.notna()].sum()),
        between_trials_n=int((~same & prev.trial.notna()).sum()))
    return phases


def run_sequential(experiment: str, only: str | None, threads: int | None) -> dict:
    """The experiment's trials one after another in this process, without Ray: wall and in-epoch times."""
    from raybench.experiments import load_experiment
    from raybench.plan import select
    from raybench.train import Trial
    t0 = time.perf_counter()
    exp = select(load_experiment(experiment), only)
    keys = TIME_COLUMNS
    out = {"trials": len(exp.trials), "epochs": 0, **{k: 0.0 for k in keys}, "per_trial_s": {}}
    for spec in exp.trials:
        for rec in Trial(spec, device="cpu", threads=threads).epochs():
            out["epochs"] += 1
            for k in keys:
                out[k] += rec.get(k, 0.0)
            out["per_trial_s"][spec.name] = out["per_trial_s"].get(spec.name, 0.0) + sum(rec.get(k, 0.0) for k in keys)
    out["trial_time_s"] = sum(out[k] for k in TIME_COLUMNS)
    out["in_process_wall_s"] = time.perf_counter() - t0
    return out


def timed_run(cmd: list[str], what: str, env: dict) -> tuple[float, str]:
    """Wall seconds and stdout of a command in a fresh process; a failure stops the benchmark with its output."""
    print(f"[bench] {what}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    return wall, r.stdout


def grid_overhead(experiment: str, only: str | None, cpus_per_trial: float) -> dict:
    """Wall time of `python -m raybench.grid --gpus 0` against the sum of its trials' in-epoch time and against
    the same trials run one after another without Ray (`python -m raybench.bench --sequential`), with the
    torch threads a grid trial gets (its CPUs), so a trial does the same work both ways; both in fresh
    processes, so both pay Python's start-up and imports."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="raybench-bench-") as tmp:
        cmd = [sys.executable, "-m", "raybench.grid", "--experiment", experiment, "--gpus", "0", "--no-analysis",
               "--no-dashboard", "--results-dir", tmp, "--name", "grid", "--cpus-per-trial", str(cpus_per_trial)]
        cmd += ["--only", only] if only else []
        load = os.getloadavg()[0]
        grid_wall, _ = timed_run(cmd, "grid overhead", env)
        grid = grid_trial_times(Path(tmp) / "grid")
        phases = grid_phases(Path(tmp) / "grid")
    seq_cmd = [sys.executable, "-m", "raybench.bench", "--sequential", experiment,
               "--threads", str(max(1, int(cpus_per_trial)))]
    seq_cmd += ["--grid-only", only] if only else []
    seq_load = os.getloadavg()[0]
    seq_wall, seq_out = timed_run(seq_cmd, "the same trials without Ray", env)
    seq = json.loads(seq_out.strip().splitlines()[-1])
    return {"experiment": experiment, "only": only or "", "cpus_per_trial": cpus_per_trial,
            "load_avg_1m_before_grid": round(load, 2), "load_avg_1m_before_sequential": round(seq_load, 2),
            "grid_command": " ".join(["python"] + cmd[1:]), "grid_wall_s": grid_wall, "grid": grid,
            "grid_phases": phases,
            "sequential_command": " ".join(["python"] + seq_cmd[1:]), "sequential_wall_s": seq_wall, "sequential": seq,
            "grid_wall_over_trial_time": grid_wall / grid["trial_time_s"],
            "grid_wall_over_sequential_wall": grid_wall / seq_wall,
            "grid_outside_epochs_s": grid_wall - grid["epochs_window_s"]}


# --- output -------------------------------------------------------------------------------------------------

def _fmt_ips(s: dict) -> str:
    return f"{s['images_per_s_median']:,.0f} ({s['images_per_s_min']:,.0f}-{s['images_per_s_max']:,.0f})"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# raybench bench, {m['date_utc']}", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs (torch's default threads "
             f"{m['torch_threads']}); GPU: {m['gpu'] or 'none'}; 1-min load average at start "
             f"{m['load_avg_1m_at_start']}",
             f"- torch {m['torch_version']} (built for CUDA {m['cuda_version'] or '-'}), torchvision "
             f"{m['torchvision_version']}, Python {m['python_version']}, "
             f"raybench {m['git_commit'] or '(no commit)'}", ""]
    summ = result["summary"]
    for bench in dict.fromkeys(s["bench"] for s in summ):
        lines += [f"## {'Training throughput' if bench == 'throughput' else 'Study ' + bench + ': one epoch'}", "",
                  "images/s: median (min-max) over n timed epochs; ratio: the loop's median over the reference's "
                  "(fp32); bf16/fp32: a bf16 row's median over the same loop's fp32 median, in this run.", "",
                  "| device | model | batch | images | loop | precision | n | images/s | epoch s | feature pass s "
                  "| compile s (cold / per Trial) | ratio | bf16/fp32 |", "|---" * 13 + "|"]
        for s in summ:
            if s["bench"] != bench:
                continue
            ratio = "" if s["ratio_to_reference"] is None else f"{s['ratio_to_reference']:.1f}x"
            vs_fp32 = "" if s.get("ratio_to_fp32") is None else f"{s['ratio_to_fp32']:.2f}x"
            comp = f"{s['compile_cold_s']:.1f} / {s['compile_time_s_median']:.2f}" if s["loop"] == LOOP_COMPILE else ""
            cache = f"{s['cache_time_s_median']:.2f}" if s["cache_time_s_median"] else ""
            lines.append(f"| {s['device_name']} | {s['model']} | {s['batch_size']} | {s['images']} | {s['loop']} | "
                         f"{s['precision']} | {s['n']} | {_fmt_ips(s)} | {s['epoch_time_s_median']:.2f} | "
                         f"{cache} | {comp} | {ratio} | {vs_fp32} |")
        present = {s["loop"] for s in summ if s["bench"] == bench}
        lines += [""] + [f"- `{k}`: {v}" for k, v in LOOP_NOTES.items() if k in present] + [""]
    errors = [r for r in result["rows"] if r["error"]]
    if errors:
        lines += ["## Errors", ""] + [f"- {r['device']} {r['model']} {r['loop']}: {r['error']}" for r in errors] + [""]
    g = result.get("grid_overhead")
    if g:
        lines += ["## Grid overhead", "", f"`{g['grid_command']}` against the same trials one after another without "
                  f"Ray (`{g['sequential_command']}`: the torch threads of a grid trial), each in a fresh process.", "",
                  "| | wall s | in-epoch time s (train + eval + feature pass + compile) | trials | epochs |",
                  "|---|---|---|---|---|",
                  f"| grid (Ray) | {g['grid_wall_s']:.1f} | {g['grid']['trial_time_s']:.1f} | {g['grid']['trials']} "
                  f"| {g['grid']['epochs']} |",
                  f"| sequential, no Ray | {g['sequential_wall_s']:.1f} | {g['sequential']['trial_time_s']:.1f} | "
                  f"{g['sequential']['trials']} | {g['sequential']['epochs']} |", "",
                  f"- grid wall / sum of its trials' in-epoch time: {g['grid_wall_over_trial_time']:.2f}",
                  f"- grid wall / sequential wall: {g['grid_wall_over_sequential_wall']:.2f}",
                  f"- grid wall outside the first-epoch-start to last-epoch-end window (Python, Ray start, actor "
                  f"start, model builds, shutdown): {g['grid_outside_epochs_s']:.1f} s",
                  f"- 1-min load average before the grid / before the sequential run: "
                  f"{g.get('load_avg_1m_before_grid', '-')} / {g.get('load_avg_1m_before_sequential', '-')}", ""]
        ph = g.get("grid_phases") or {}
        if ph:
            spent = ("ray_start", "tune_run", "ray_shutdown", "report_and_analysis")
            before = g["grid_wall_s"] - sum(ph[k] for k in spent)  # the process's start to the plan made
            lines += ["Where the grid's wall time went (s; idle: between consecutive epochs of one actor process):",
                      "", "| Python, imports, plan | Ray start | Tune run | of it: to the first epoch | after the "
                      "last epoch | Ray shutdown | report | actor processes | idle within a trial (n) | idle "
                      "between trials (n) |", "|---|---|---|---|---|---|---|---|---|---|",
                      f"| {before:.1f} | {ph['ray_start']:.1f} | {ph['tune_run']:.1f} | {ph['first_epoch_after_s']:.1f} "
                      f"| {ph['after_last_epoch_s']:.1f} | {ph['ray_shutdown']:.1f} | {ph['report_and_analysis']:.1f} "
                      f"| {ph['actor_processes']} | {ph['between_epochs_s']:.1f} ({ph['between_epochs_n']}) "
                      f"| {ph['between_trials_s']:.1f} ({ph['between_trials_n']}) |", ""]
        lines += ["| trial | in-epoch s, grid | in-epoch s, sequential |", "|---|---|---|"]
        lines += [f"| {t} | {s:.1f} | {g['sequential']['per_trial_s'].get(t, float('nan')):.1f} |"
                  for t, s in g["grid"]["per_trial_s"].items()] + [""]
    return "\n".join(lines)


def write_results(out: Path, result: dict) -> None:
    import pandas as pd
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    prov = {k: result["machine"][k] for k in ("cpu_model", "gpu", "torch_version", "cuda_version", "git_commit")}
    pd.DataFrame([{**r, **prov} for r in result["rows"]]).to_parquet(out / "bench.parquet", index=False)
    (out / "bench.md").write_text(markdown(result))


# --- CLI ----------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.bench", description=(
        "Training throughput of raybench's trial loop next to a plain DataLoader/PIL/fp32 loop, the grid's "
        "scheduling overhead, and (CUDA) one epoch of each seed trial. Writes bench.json, bench.parquet, bench.md."))
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated model names (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--device", help="comma-separated devices: cpu, cuda, cuda:N (default: cpu, plus cuda when present)")
    p.add_argument("--images", type=int, help="training images per timed epoch (default: 512 on CPU, 10000 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed epochs per loop (default: 3; --study: 1)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the seed recipe's: 64, Swin 32)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (default: 2 on CUDA, 0 on CPU)")
    p.add_argument("--threads", type=int, help="CPU torch threads for both loops (default: torch's default)")
    p.add_argument("--warmup-batches", type=int, default=3, help="warm-up batches before timing (default: 3)")
    p.add_argument("--compile", action="store_true", help="also time raybench with torch.compile (default: off)")
    p.add_argument("--precision", default="auto",
                   help="raybench's precision, or a comma-separated list timed side by side in this run: auto (bf16 "
                        "where the device computes it natively, else fp32), bf16, fp32 (default: auto)")
    p.add_argument("--grid-overhead", action="store_true",
                   help="also time the grid against its trials' own time and against running them without Ray")
    p.add_argument("--grid-experiment", default="smoke", help="experiment for --grid-overhead (default: smoke)")
    p.add_argument("--grid-only", help="only the trials matching this pattern, as grid --only (default: all)")
    p.add_argument("--grid-cpus-per-trial", type=float, default=1.0,
                   help="grid --cpus-per-trial for --grid-overhead (default: 1)")
    p.add_argument("--study", choices=STUDIES,
                   help="CUDA only: one epoch of each of the experiment's trials on data of CIFAR-100's size, next "
                        "to the reference loop's")
    p.add_argument("--out", default="results/bench", help="output folder (default: results/bench)")
    p.add_argument("--sequential", metavar="EXPERIMENT", help=argparse.SUPPRESS)  # --grid-overhead's other half
    return p


def parse_devices(text: str | None) -> list[str]:
    if not text:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    from raybench.train import pick_device
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        pick_device(d)  # the trial's own check: cpu, cuda or cuda:N of a device this machine has
    return devices


def study_trials(name: str) -> list[TrialSpec]:
    from raybench.experiments import load_experiment
    exp = load_experiment(name, dataset="synthetic", train_size=CIFAR_TRAIN, test_size=CIFAR_TEST)
    return exp.trials


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # a load report per Trial (the new 100-class head) would bury the table
    if args.sequential:
        print(json.dumps(run_sequential(args.sequential, args.grid_only, args.threads)))
        return 0
    try:
        for flag in ("images", "repeats", "batch_size", "threads"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise ValueError(f"--{flag.replace('_', '-')}={v}: must be >= 1")
        if not (math.isfinite(args.grid_cpus_per_trial) and args.grid_cpus_per_trial > 0):
            raise ValueError(f"--grid-cpus-per-trial={args.grid_cpus_per_trial:g}: must be a finite number > 0")
        bad = [p for p in args.precision.split(",") if p not in PRECISIONS]
        if bad or not args.precision:
            raise ValueError(f"--precision {args.precision}: {', '.join(map(repr, bad)) or 'empty'}; accepted: "
                             f"{', '.join(PRECISIONS)}, or a comma-separated list of them")
        if args.study:
            if not torch.cuda.is_available():
                raise ValueError(f"--study {args.study} needs CUDA: it times the study's full-size trials on a GPU, "
                                 f"and torch {torch.__version__} sees no CUDA device here")
            devices = [d for d in parse_devices(args.device or "cuda") if d.startswith("cuda")]
            if not devices:
                raise ValueError(f"--study {args.study} --device {args.device}: the study runs on CUDA devices only "
                                 "(cuda or cuda:N)")
            study = {t.model.name: t for t in study_trials(args.study)}
            models = list(study)
        else:
            study = {}
            devices = parse_devices(args.device)
            models = [m.strip() for m in args.models.split(",") if m.strip()]
        from raybench.models import check_model
        for m in models:
            if m not in study:  # an experiment's trials are built already; names may be custom
                check_model(parse_model_name(m))
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    command = "python -m raybench.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "machine": machine_info(), "args": vars(args), "rows": [],
              "grid_overhead": None}
    bench = f"study-{args.study}" if args.study else "throughput"
    repeats = args.repeats or (1 if args.study else 3)
    for device in devices:
        n = args.images or (CIFAR_TRAIN if args.study else (10_000 if device.startswith("cuda") else 512))
        # Test images in CIFAR-100's proportion (1:5): a cached trial's feature pass covers them too.
        data = synthetic(n, CIFAR_TEST if args.study else max(1, n // 5), num_classes=100)
        for name in models:
            print(f"[bench] {device} {name}: {n} images, {repeats} timed epoch(s) per loop", flush=True)
            try:
                rows = measure_model(name, data, device, args, repeats, bench, study.get(name))
            except Exception as e:  # a failed model is a row, not a crash
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                rows = [{"bench": bench, "device": device, "device_name": device, "model": name, "loop": "",
                         "repeat": 0, "batch_size": 0, "images": n, "threads": torch.get_num_threads(),
                         "epoch_time_s": float("nan"), "images_per_s": float("nan"), "workers": 0, "precision": "",
                         **ROW_DEFAULTS, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}]
                print(f"[bench]   failed: {rows[0]['error']}", flush=True)
            result["rows"] += rows
            for s in summarise(rows):
                ratio = "" if s["ratio_to_reference"] is None else f"  {s['ratio_to_reference']:.1f}x reference"
                ratio += "" if s["ratio_to_fp32"] is None else f", {s['ratio_to_fp32']:.2f}x fp32"
                print(f"[bench]   {s['loop']:<17} {s['precision']:<5} {_fmt_ips(s):>28} img/s  epoch "
                      f"{s['epoch_time_s_median']:.2f}s{ratio}", flush=True)
    result["summary"] = summarise(result["rows"])
    if args.grid_overhead:
        try:
            result["grid_overhead"] = grid_overhead(args.grid_experiment, args.grid_only, args.grid_cpus_per_trial)
        except Exception as e:  # the throughput rows are measured already: keep them, record why this failed
            result["grid_overhead"] = None
            result["grid_overhead_error"] = str(e)
            print(f"[bench] grid overhead failed: {e}", file=sys.stderr)
    out = Path(args.out).expanduser()
    write_results(out, result)
    print(markdown(result))
    print(f"[bench] results: {out / 'bench.json'}, {out / 'bench.parquet'}, {out / 'bench.md'}")
    return 0 if not any(r["error"] for r in result["rows"]) and "grid_overhead_error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
