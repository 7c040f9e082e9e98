"""One training trial: a model config trained with a recipe, evaluated on the test set after every epoch.

Usable without Ray (`python -m raybench.train ...`, or `Trial(spec).epochs()`); the grid wraps the same
`Trial` in a Ray Tune class trainable (raybench.grid). Each epoch yields one flat record (see docs/results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from raybench.configs import PRECISIONS, ConfigError, DataSpec, ModelConfig, Recipe, TrialSpec, default_recipe
from raybench.data import Dataset, epoch_indices, load_dataset, prepare
from raybench.flags import add_model_args, model_from_args
from raybench.sizing import (CACHE_OFF_AUGMENT, CACHE_OFF_NOT_FROZEN, CACHE_ON, EVAL_BATCH, feature_cache_mode,
                             input_side)

from raybench.records import DIVERGED, OK, OOM, RUNNING, step_note


# A long epoch says how far it has got at this pace: minutes of silence read as a hung run.
PROGRESS_EVERY_S = 30.0


def lr_at(step: int, total_steps: int, steps_per_epoch: int, r: Recipe) -> float:
    """The learning rate as a pure function of the optimiser step."""
    if r.schedule == "constant":
        return r.lr
    warmup = int(r.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return r.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return r.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pick_device(requested: str | None = None) -> torch.device:
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = requested[5:] if requested.startswith("cuda:") else "0"
    if requested not in ("cpu", "cuda") and not (requested.startswith("cuda:") and index.isdigit()):
        raise ValueError(f"device={requested!r}: expected cpu, cuda or cuda:N")
    if requested != "cpu":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index) >= n:
            raise ValueError(f"device={requested!r}: this machine has {n} CUDA device(s)"
                             + ("; use 'cpu'" if n == 0 else f"; use cuda:0 to cuda:{n - 1} or 'cpu'"))
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware, as torch reads it: a CUDA GPU that supports it without
    emulation; an x86 CPU with AVX-512-BF16 or AMX-BF16 (torch.cpu.get_capabilities, else /proc/cpuinfo's
    flags on a torch without it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        c = caps()
        return bool(c.get("avx512_bf16") or c.get("amx_bf16"))
    try:
        flags = next(l.split(":", 1)[1].split() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" (autocast) or "fp32" for a requested setting on a device: "auto" is bf16 where the device computes
    it natively and fp32 elsewhere (emulated bf16 is slower than fp32); "bf16"/"fp32" are taken as asked."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: must be one of {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def uses_channels_last(cfg: ModelConfig) -> bool:
    """cuDNN and oneDNN convolutions both run faster in NHWC; the transformers' linears do not care."""
    return cfg.family == "resnet"


def bound_compile_workers(threads: int) -> None:
    """Inductor compiles in a pool of min(32, host CPUs) worker processes, whatever Ray gave the trial: bound it
    to the trial's CPUs (or lower, where TORCHINDUCTOR_COMPILE_THREADS says so). Read when the pool starts, at
    the first compile in the process: a Ray trial is a fresh process, so it holds there."""
    from torch._inductor import config
    env = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    config.compile_threads = min(threads, int(env)) if env else threads


class Trial:
    """Model, data, optimiser and RNG state of one trial; `epochs()` trains and yields a record per epoch.

    `feature_cache=False` turns off the frozen-backbone feature cache (the uncached path, kept for the test
    that the two agree); `compile` defaults to `spec.compile`."""

    progress_every_s = PROGRESS_EVERY_S  # an epoch running longer prints its step count this often

    def __init__(self, spec: TrialSpec, device: str | None = None, threads: int | None = None,
                 dataset: Dataset | None = None, feature_cache: bool = True, compile: bool | None = None):
        self.device = pick_device(device)
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(int(threads))  # packed CPU trials must not fight over cores
        self._load_data(spec, dataset)
        self.recipe = self.spec.recipe
        self.precision = resolve_precision(self.spec.precision, self.device)  # "bf16" or "fp32"
        self.channels_last = uses_channels_last(self.spec.model)
        self._seed_rng()
        self._build_model()
        self.opt = make_optimiser(self.model, self.recipe, self.device)
        self.steps_per_epoch = math.ceil(len(self.data.train_y) / self.recipe.batch_size)
        self.epoch, self.step = 0, 0  # epochs done, optimiser steps done
        self.status = RUNNING  # after the last yielded record; a trial that ended trains no more
        # Cached: the training steps and evaluation run the head on stored backbone features.
        self.feature_cache = feature_cache_mode(self.spec, feature_cache)
        self.features: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, test); not checkpointed
        self.compile = self.spec.compile if compile is None else bool(compile)  # the record's `compiled`
        self.warmed_up = False  # the compile warm-up ran: every input shape of an epoch has its graph
        self.forward = self._forward(threads)

    # --- the steps of __init__, in the order they run ---
    def _load_data(self, spec: TrialSpec, dataset: Dataset | None) -> None:
        # an image folder loads at the model's own input side
        data = dataset or load_dataset(spec.data, spec.model.num_classes, input_side(spec))
        if data.num_classes != spec.model.num_classes:  # an image folder decides its own classes
            spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, num_classes=data.num_classes))
        self.spec = spec
        self.data_mean_std = data.mean_std
        self.data = data.to(self.device)

    def _seed_rng(self) -> None:
        torch.manual_seed(self.spec.seed)  # the model's initial weights
        self.gen = torch.Generator(device=self.device).manual_seed(self.spec.seed)  # shuffles, augmentation

    def _build_model(self) -> None:
        from raybench.models import build_model
        self.model = build_model(self.spec.model).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mean, std = self.data_mean_std
        if self.model.mean is not None:  # pretrained weights expect their own statistics
            mean, std = torch.tensor(self.model.mean), torch.tensor(self.model.std)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.input_size = self.model.input_size

    def _forward(self, threads: int | None):
        """What the steps call: the model, or its head alone on cached features; compiled when asked.
        self.model stays the plain module, so its state_dict keys and checkpoints do not change with compile."""
        fwd = self.model.forward_head if self.feature_cache == CACHE_ON else self.model
        if not self.compile:
            return fwd
        if threads:
            bound_compile_workers(int(threads))
        return torch.compile(fwd)

    # --- RNG state: checkpoints save it, the compile warm-up puts it back ---
    def _rng_state(self) -> dict:
        return {"gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def _set_rng_state(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        if s.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)

    # --- checkpoints (plain tensors and numbers: they load with weights_only=True) ---
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                "step": self.step, "status": self.status, **self._rng_state(), "spec": self.spec.to_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.epoch, self.step = int(s["epoch"]), int(s["step"])
        self.status = s.get("status", OK if self.epoch >= self.recipe.epochs else RUNNING)
        self._set_rng_state(s)

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Path) -> None:
        # On the CPU first: RNG states must stay CPU ByteTensors; load_state_dict moves the rest to the device.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # --- the pieces of an epoch ---
    def _sync(self):
        """Wait for the device: the only CPU-GPU sync points besides the once-per-epoch `.item()` reads."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _batch(self, x, augment=()):
        x = prepare(x, self.mean, self.std, self.input_size, augment, self.gen)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _train_inputs(self, idx):
        if self.features is not None:
            return self.features[0][idx]
        return self._batch(self.data.train_x[idx], self.recipe.augment)

    def _test_inputs(self, s: int, e: int):
        return self.features[1][s:e] if self.features is not None else self._batch(self.data.test_x[s:e])

    def _one_off_costs(self) -> dict:
        """What the first epoch this object trains pays before its clock starts: the feature pass (a resumed
        trial recomputes it: features are not in checkpoints) and the compile warm-up; 0 s later on."""
        costs = {"cache_time_s": 0.0, "compile_time_s": 0.0}
        if self.feature_cache == CACHE_ON and self.features is None:
            costs["cache_time_s"] = cache_features(self)
        if self.compile and not self.warmed_up:
            costs["compile_time_s"] = compile_warm_up(self)
        return costs

    def train_epoch(self) -> dict:
        self.model.train()
        d, r = self.data, self.recipe
        total_steps = self.steps_per_epoch * r.epochs
        loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        self._sync()
        t0 = time.perf_counter()
        next_note = t0 + self.progress_every_s
        for i, idx in enumerate(epoch_indices(len(d.train_y), r.batch_size, self.gen, self.device), 1):
            lr = lr_at(self.step, total_steps, self.steps_per_epoch, r)
            for g in self.opt.param_groups:
                g["lr"] = lr
            x, y = self._train_inputs(idx), d.train_y[idx]
            with self._autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            if time.perf_counter() >= next_note:
                next_note = self._note_progress(i, t0)
        self._sync()
        dt = time.perf_counter() - t0
        n = len(d.train_y)
        return {"train_loss": loss_sum.item() / n, "train_acc": correct.item() / n, "train_time_s": dt,
                "images_per_s": n / dt, "lr": lr}

    def _note_progress(self, steps: int, t0: float) -> float:
        """One line on the epoch so far (on a GPU, steps queued: the device may be a few behind); returns when
        the next is due."""
        now = time.perf_counter()
        left = (now - t0) / steps * (self.steps_per_epoch - steps)
        print(step_note(self.spec.name, self.epoch + 1, self.recipe.epochs, steps, self.steps_per_epoch, now - t0,
                        left), flush=True)
        return now + self.progress_every_s

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        d = self.data
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for s in range(0, len(d.test_y), EVAL_BATCH):
            x, y = self._test_inputs(s, s + EVAL_BATCH), d.test_y[s:s + EVAL_BATCH]
            with self._autocast():
                logits = self.forward(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        n = len(d.test_y)
        out = {"test_loss": loss_sum.item() / n, "test_acc": correct.item() / n}  # .item() waits for the device
        out["eval_time_s"] = time.perf_counter() - t0
        return out

    # --- the epochs ---
    def epochs(self) -> Iterator[dict]:
        """Train the remaining epochs; yield one record each. Stops early, with its status, on divergence
        or on running out of GPU memory.

        The first epoch this object trains also reports the one-off costs it paid before its clock started:
        `cache_time_s` (the feature pass) and `compile_time_s` (the compile warm-up); later epochs report 0."""
        device = device_name(self.device)
        while self.epoch < self.recipe.epochs and self.status == RUNNING:
            started_at = time.time()
            if self.device.type == "cuda":  # the epoch's peak includes its feature pass and compile warm-up
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                costs = self._one_off_costs()
                rec = self.train_epoch()
                rec.update(self.evaluate())  # evaluation at batch 256 is as likely to run out as training
            except torch.cuda.OutOfMemoryError as e:
                self.status = OOM
                yield {"epoch": self.epoch + 1, "status": OOM, "error": str(e).splitlines()[0],
                       "device": device, "precision": self.precision}
                return
            self.epoch += 1
            diverged = not math.isfinite(rec["train_loss"])
            self.status = DIVERGED if diverged else (OK if self.epoch == self.recipe.epochs else RUNNING)
            yield {"epoch": self.epoch, **rec, **costs, "feature_cache": self.feature_cache,
                   "compiled": self.compile, "peak_memory_mb": peak_memory_mb(self.device), "status": self.status,
                   "error": f"non-finite training loss ({rec['train_loss']}) in epoch {self.epoch}" if diverged
                   else "", "device": device, "precision": self.precision, "threads": torch.get_num_threads(),
                   "started_at": started_at, "finished_at": time.time(), "num_classes": self.data.num_classes,
                   "train_images": len(self.data.train_y), "test_images": len(self.data.test_y)}
            if diverged:
                return


def make_optimiser(model: torch.nn.Module, r: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW over the trainable parameters (a frozen backbone's are left out); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if r.optimizer == "adamw" else torch.optim.Adam
    fused = {"fused": True} if device.type == "cuda" else {}
    return opt_cls(params, lr=r.lr, weight_decay=r.weight_decay, **fused)


@torch.no_grad()
def cache_features(trial: Trial) -> float:
    """The feature pass: the frozen backbone's features of the training and test sets, stored in
    `trial.features`. Uses no RNG, so the cached and uncached paths draw the same shuffles. Returns the seconds
    it took."""
    trial.model.eval()
    trial._sync()
    t0 = time.perf_counter()
    # A GPU is busiest with large batches; on CPU the training batch runs faster (it stays in cache).
    B = EVAL_BATCH if trial.device.type == "cuda" else trial.recipe.batch_size
    feats = []
    for x in (trial.data.train_x, trial.data.test_x):
        parts = []
        for s in range(0, len(x), B):
            with trial._autocast():
                parts.append(trial.model.forward_features(trial._batch(x[s:s + B])))  # (B, C)
        feats.append(torch.cat(parts))
    trial.features = (feats[0], feats[1])
    trial._sync()
    return time.perf_counter() - t0


def compile_warm_up(trial: Trial) -> float:
    """Compile before the clock starts. One forward+backward per training batch shape (full and last short
    batch) and one no-grad eval forward per test batch shape, on the first images without augmentation. No
    optimiser step; gradients are dropped and the RNG states and buffers (BatchNorm statistics) restored, so the
    run trains exactly as if the warm-up had not happened. The time returned is compilation plus the compute of
    these few passes (a few steps' worth)."""
    d, B, model = trial.data, trial.recipe.batch_size, trial.model
    rng = trial._rng_state()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    trial._sync()
    t0 = time.perf_counter()
    n, m = len(d.train_y), len(d.test_y)
    model.train()
    for b in sorted({min(B, n), n % B or min(B, n)}, reverse=True):
        x = trial.features[0][:b] if trial.features is not None else trial._batch(d.train_x[:b])  # no RNG
        with trial._autocast():
            loss = F.cross_entropy(trial.forward(x).float(), d.train_y[:b])
        loss.backward()
    trial.opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for b in sorted({min(EVAL_BATCH, m), m % EVAL_BATCH or min(EVAL_BATCH, m)}, reverse=True):
            with trial._autocast():
                trial.forward(trial._test_inputs(0, b))
    trial._sync()
    dt = time.perf_counter() - t0
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    trial._set_rng_state(rng)
    trial.warmed_up = True
    return dt


def progress_line(name: str, rec: dict, epochs: int) -> str:
    if "train_loss" not in rec:
        return f"[{name}] epoch {rec['epoch']}/{epochs} {rec['status']}: {rec['error']}"
    return (f"[{name}] epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.3f} acc "
            f"{100 * rec['train_acc']:.1f}%  test acc {100 * rec['test_acc']:.1f}%  "
            f"train {rec['train_time_s']:.1f}s ({rec['images_per_s']:.0f} img/s)  eval {rec['eval_time_s']:.1f}s"
            + (f"  feature pass {rec['cache_time_s']:.1f}s" if rec.get("cache_time_s") else "")
            + (f"  compile {rec['compile_time_s']:.1f}s" if rec.get("compile_time_s") else "")
            + ("" if rec["status"] in (OK, RUNNING) else f"  {rec['status'].upper()}: {rec['error']}"))


# --- CLI --------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.train",
                                description="Train one model config without Ray; one progress line per epoch.")
    add_model_args(p)
    p.add_argument("--recipe", default="seed", choices=["seed", "improved"], help="training recipe (default: seed)")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's: 30, Swin 3)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's: 64, Swin 32)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's: 1e-3, Swin 2e-5)")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cifar100", "imagefolder"],
                   help="dataset (default: synthetic)")
    p.add_argument("--data-dir", help="CIFAR-100 copy / download folder, or the image folder root")
    p.add_argument("--train-size", type=int, default=10_000,
                   help="synthetic training images (default: 10000; the full-size stand-in is 50000)")
    p.add_argument("--test-size", type=int, default=2_000, help="synthetic test images (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model; compile time is reported apart from epoch time (default: off)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="bf16 autocast or fp32; auto: bf16 where the device computes it natively (a CUDA GPU with "
                        "bf16, a CPU with AVX-512-BF16 or AMX), else fp32 (default: auto)")
    p.add_argument("--json", action="store_true", help="also print each epoch record as a JSON line")
    return p


def spec_from_args(args) -> TrialSpec:
    model = model_from_args(args)
    recipe = default_recipe(args.recipe, model)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
                 if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    data = DataSpec(args.dataset, args.data_dir, args.train_size, args.test_size)
    return TrialSpec(model, recipe, data, args.seed, compile=args.compile, precision=args.precision)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from raybench.data import DatasetUnavailable
    from raybench.models import WeightsUnavailable
    print(f"[{spec.name}] {spec.data.name} data, recipe {spec.recipe.name}: batch {spec.recipe.batch_size}, "
          f"{spec.recipe.optimizer} lr {spec.recipe.lr}, {spec.recipe.epochs} epochs", flush=True)
    try:
        trial = Trial(spec, device=args.device, threads=args.threads)
    except (DatasetUnavailable, WeightsUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{spec.name}] device {device_name(trial.device)} ({trial.precision}), {len(trial.data.train_y)} train / "
          f"{len(trial.data.test_y)} test images" + (" (synthetic)" if trial.data.synthetic else ""), flush=True)
    if trial.feature_cache != CACHE_OFF_NOT_FROZEN:
        print(f"[{spec.name}] frozen backbone: feature cache {trial.feature_cache}"
              + (" (augmented images differ every epoch)" if trial.feature_cache == CACHE_OFF_AUGMENT else ""),
              flush=True)
    rec = {}
    for rec in trial.epochs():
        print(progress_line(spec.name, rec, spec.recipe.epochs), flush=True)
        if args.json:
            print(json.dumps(rec), flush=True)
    return 0 if rec.get("status") == OK else 1


if __name__ == "__main__":
    sys.exit(main())
