"""One training trial: a model config trained with a recipe, evaluated on the test set after every epoch.

Usable without Ray (`python -m raybench.train ...`, or `Trial(spec).epochs()`); the grid wraps the same
`Trial` in a Ray Tune function trainable. Each epoch yields one flat record (see docs/results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from raybench.configs import (ConfigError, DataSpec, Recipe, SwinConfig, TrialSpec, add_model_args,
                              default_recipe, model_from_args)
from raybench.data import Dataset, epoch_indices, load_dataset, prepare

STATUS_RUNNING, STATUS_OK, STATUS_DIVERGED, STATUS_OOM = "running", "ok", "diverged", "oom"


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
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={requested!r}: CUDA is not available here; use 'cpu'")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trial:
    """Model, data, optimiser and RNG state of one trial; `epochs()` trains and yields a record per epoch."""

    def __init__(self, spec: TrialSpec, device: str | None = None, threads: int | None = None,
                 dataset: Dataset | None = None):
        from raybench.models import build_model
        self.spec, self.recipe = spec, spec.recipe
        self.device = pick_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(max(1, int(threads)))  # packed CPU trials must not fight over cores
        image_size = getattr(spec.model, "image_size", 32)
        data = dataset or load_dataset(spec.data, spec.model.num_classes, image_size)
        if data.num_classes != spec.model.num_classes:  # an image folder decides its own classes
            spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, num_classes=data.num_classes))
            self.spec = spec
        torch.manual_seed(spec.seed)
        self.model = build_model(spec.model).to(self.device)
        if self.device.type == "cuda" and spec.model.family == "resnet":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data = data.to(self.device)
        mean, std = data.mean_std
        if self.model.mean is not None:  # pretrained weights expect their own statistics
            mean, std = torch.tensor(self.model.mean), torch.tensor(self.model.std)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.input_size = self.model.input_size
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if self.recipe.optimizer == "adamw" else torch.optim.Adam
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = opt_cls(params, lr=self.recipe.lr, weight_decay=self.recipe.weight_decay, **fused)
        self.gen = torch.Generator(device=self.device).manual_seed(spec.seed)
        self.steps_per_epoch = math.ceil(len(data.train_y) / self.recipe.batch_size)
        self.epoch, self.step = 0, 0  # epochs done, optimiser steps done

    # --- checkpoints (plain tensors and numbers: they load with weights_only=True) ---
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                "step": self.step, "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "spec": self.spec.to_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.epoch, self.step = int(s["epoch"]), int(s["step"])
        self.gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    # --- one epoch ---
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _batch(self, x, augment=()):
        x = prepare(x, self.mean, self.std, self.input_size, augment, self.gen)
        if self.device.type == "cuda" and self.spec.model.family == "resnet":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_epoch(self) -> dict:
        self.model.train()
        d, r = self.data, self.recipe
        total_steps = self.steps_per_epoch * r.epochs
        loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for idx in epoch_indices(len(d.train_y), r.batch_size, self.gen, self.device):
            lr = lr_at(self.step, total_steps, self.steps_per_epoch, r)
            for g in self.opt.param_groups:
                g["lr"] = lr
            x, y = self._batch(d.train_x[idx], r.augment), d.train_y[idx]
            with self._autocast():
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        n = len(d.train_y)
        return {"train_loss": loss_sum.item() / n, "train_acc": correct.item() / n, "train_time_s": dt,
                "images_per_s": n / dt, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        d = self.data
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for s in range(0, len(d.test_y), 256):
            x, y = self._batch(d.test_x[s:s + 256]), d.test_y[s:s + 256]
            with self._autocast():
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        n = len(d.test_y)
        out = {"test_loss": loss_sum.item() / n, "test_acc": correct.item() / n}
        out["eval_time_s"] = time.perf_counter() - t0
        return out

    def epochs(self) -> Iterator[dict]:
        """Train the remaining epochs; yield one record each. Stops early, with its status, on divergence
        or on running out of GPU memory."""
        device = device_name(self.device)
        while self.epoch < self.recipe.epochs:
            started_at = time.time()
            try:
                rec = self.train_epoch()
            except torch.cuda.OutOfMemoryError as e:
                yield {"epoch": self.epoch + 1, "status": STATUS_OOM, "error": str(e).splitlines()[0],
                       "device": device}
                return
            self.epoch += 1
            rec.update(self.evaluate())
            diverged = not math.isfinite(rec["train_loss"])
            status = STATUS_DIVERGED if diverged else (STATUS_OK if self.epoch == self.recipe.epochs
                                                       else STATUS_RUNNING)
            yield {"epoch": self.epoch, **rec, "peak_memory_mb": peak_memory_mb(self.device), "status": status,
                   "error": f"non-finite training loss ({rec['train_loss']}) in epoch {self.epoch}" if diverged
                   else "", "device": device, "started_at": started_at, "finished_at": time.time()}
            if diverged:
                return


def progress_line(name: str, rec: dict, epochs: int) -> str:
    if "train_loss" not in rec:
        return f"[{name}] epoch {rec['epoch']}/{epochs} {rec['status']}: {rec['error']}"
    return (f"[{name}] epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.3f} acc "
            f"{100 * rec['train_acc']:.1f}%  test acc {100 * rec['test_acc']:.1f}%  "
            f"train {rec['train_time_s']:.1f}s ({rec['images_per_s']:.0f} img/s)  eval {rec['eval_time_s']:.1f}s"
            + ("" if rec["status"] in (STATUS_OK, STATUS_RUNNING) else f"  {rec['status'].upper()}: {rec['error']}"))


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
    p.add_argument("--json", action="store_true", help="also print each epoch record as a JSON line")
    return p


def spec_from_args(args) -> TrialSpec:
    model = model_from_args(args)
    recipe = default_recipe(args.recipe, model)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
                 if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    data = DataSpec(args.dataset, args.data_dir, args.train_size, args.test_size)
    return TrialSpec(model, recipe, data, args.seed)


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
    print(f"[{spec.name}] device {device_name(trial.device)}, {len(trial.data.train_y)} train / "
          f"{len(trial.data.test_y)} test images" + (" (synthetic)" if trial.data.synthetic else ""), flush=True)
    rec = {}
    for rec in trial.epochs():
        print(progress_line(spec.name, rec, spec.recipe.epochs), flush=True)
        if args.json:
            print(json.dumps(rec), flush=True)
    return 0 if rec.get("status") == STATUS_OK else 1


if __name__ == "__main__":
    sys.exit(main())
