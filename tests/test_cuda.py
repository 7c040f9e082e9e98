"""raybench on a real GPU: every family trains, bf16 autocast, a resume from a checkpoint written on CUDA, the
allocator cap's out-of-memory error, torch.compile, and the smoke grid packed onto one GPU.

Marked `cuda` and skipped (counted as skipped) where torch sees no CUDA device, so the suite passes on CPU-only
machines; `pytest -m cuda` runs just these, and `bash scripts/gpu-check.sh` runs them first on a GPU machine.
The CPU versions are in test_train.py, test_speed.py and test_grid.py."""
import dataclasses
import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import SMALL_VIT, TINY_VIT, run_grid
from raybench.configs import DataSpec, ResNetConfig, SwinConfig, TrialSpec, default_recipe
from raybench.gpucheck import max_at_once
from raybench.records import OK, OOM, RUNNING
from raybench.train import Trial
from test_train import CHANCE_BEATEN, spec_for

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def bf16(spec: TrialSpec) -> TrialSpec:
    """The spec with bf16 asked for, where specs have a precision setting; before that, bf16 autocast is what
    every CUDA trial used."""
    fields = {f.name for f in dataclasses.fields(TrialSpec)}
    return dataclasses.replace(spec, precision="bf16") if "precision" in fields else spec


def run(spec, data, **kw):
    return list(Trial(spec, device="cuda", dataset=data, **kw).epochs())


def smaller(data, n, n_test):
    return dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n], test_x=data.test_x[:n_test],
                               test_y=data.test_y[:n_test])


@pytest.mark.parametrize("model, recipe", [
    (SMALL_VIT, {}),
    (ResNetConfig("cifar", num_classes=10), {}),  # the study's stem: cheap on a GPU, unlike on 2 CPU cores
    ("swin-ft", {"lr": 3e-3}),  # random "pretrained" features: a larger head lr, as on CPU
    ("swin-scratch", {"lr": 1e-3}),
], ids=["vit", "resnet18-cifar", "swin-ft", "swin-scratch"])
def test_every_family_trains_on_cuda_and_its_loss_falls(model, recipe, small_synthetic, tiny_swin_dir):
    if isinstance(model, str):
        model = SwinConfig(tiny_swin_dir, finetune=model == "swin-ft", num_classes=10)
    recs = run(spec_for(model, epochs=3, **recipe), small_synthetic)
    assert [r["status"] for r in recs] == [RUNNING, RUNNING, OK]
    assert all(r["device"] == torch.cuda.get_device_name(0) for r in recs)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"], [r["train_loss"] for r in recs]
    assert recs[-1]["test_acc"] > CHANCE_BEATEN, recs
    assert all(0 < r["peak_memory_mb"] for r in recs)  # the CUDA allocator's peak, not the process's RSS


class LossDtypes(TorchFunctionMode):
    """Records the dtype of every cross-entropy the trainer computes while active."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.cross_entropy:
            self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("model", [TINY_VIT, ResNetConfig("cifar", num_classes=10)], ids=["vit", "resnet18-cifar"])
def test_bf16_autocast_gives_bf16_logits_an_fp32_loss_and_fp32_weights(model, small_synthetic):
    trial = Trial(bf16(spec_for(model, epochs=1)), device="cuda", dataset=smaller(small_synthetic, 256, 256))
    logits = []
    trial.model.register_forward_hook(lambda m, i, out: logits.append(out.dtype))
    with LossDtypes() as losses:
        rec = next(trial.epochs())
    assert rec["status"] == OK
    assert set(logits) == {torch.bfloat16} and len(logits) == 4 + 1  # 4 training batches of 64, 1 test batch
    assert set(losses.dtypes) == {torch.float32}  # logits go to the loss as fp32
    assert {p.dtype for p in trial.model.parameters()} == {torch.float32}  # autocast keeps fp32 master weights


def test_a_checkpoint_written_on_cuda_resumes_to_the_uninterrupted_run(small_synthetic, tmp_path):
    spec = bf16(spec_for(TINY_VIT, epochs=3, augment=("flip", "crop"), schedule="cosine", warmup_epochs=1.0,
                         optimizer="adamw"))
    full = run(spec, small_synthetic)
    first = Trial(spec, device="cuda", dataset=small_synthetic)
    assert first.opt.defaults["fused"] and first.gen.device.type == "cuda"
    next(first.epochs())
    first.save(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    assert state["cuda_rng"] is not None  # the device's global RNG travels with the batch generator's state

    def resumed(keep_generator=True):
        t = Trial(spec, device="cuda", dataset=small_synthetic)
        t.load(tmp_path / "state.pt")
        if not keep_generator:
            t.gen.manual_seed(12345)
        return list(t.epochs())

    rest = resumed()
    assert [r["epoch"] for r in rest] == [2, 3]
    # cuDNN and atomics in some CUDA kernels round differently from run to run, so equality is up to 1e-3 (the
    # last bits of bf16 sums); a resume that lost state misses by more: the control below, whose only change is
    # the generator's state (other shuffles, flips and crops), must fail this comparison.
    for r, f in zip(rest, full[1:]):
        assert r["train_loss"] == pytest.approx(f["train_loss"], rel=1e-3)
        assert r["test_loss"] == pytest.approx(f["test_loss"], rel=1e-3)
        assert r["test_acc"] == pytest.approx(f["test_acc"], abs=0.01)
    control = resumed(keep_generator=False)
    assert control[0]["train_loss"] != pytest.approx(full[1]["train_loss"], rel=1e-3), "the comparison cannot fail"


OOM_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from raybench.configs import DataSpec, Recipe, TrialSpec, ViTConfig
    from raybench.data import synthetic
    from raybench.sizing import CUDA_OVERHEAD_BYTES, allocator_fraction
    from raybench.train import Trial
    total = torch.cuda.get_device_properties(0).total_memory
    cap_bytes = 512 * 2**20
    share = (cap_bytes + CUDA_OVERHEAD_BYTES) / total  # the grid's share that leaves this trial 512 MiB
    # need=0: an estimate that missed what the trial uses, the case the OOM path is there for
    torch.cuda.set_per_process_memory_fraction(allocator_fraction("oom-test", 0, share, total))
    out = {"cap_bytes": cap_bytes}
    try:
        torch.empty(cap_bytes + 2**20, dtype=torch.uint8, device="cuda")
        out["plain"] = "allocated"
    except torch.cuda.OutOfMemoryError as e:
        out["plain"] = type(e).__name__
    # Weights and 4096 images (12 MB) fit in 512 MiB; a training batch of 2048 at 65 tokens x 8 layers does not.
    spec = TrialSpec(ViTConfig(4, 256, 8, 4, 4.0, num_classes=10), Recipe(batch_size=2048, epochs=1),
                     DataSpec("synthetic", train_size=4096, test_size=256))
    trial = Trial(spec, device="cuda", dataset=synthetic(4096, 256, num_classes=10))
    out["record"] = next(trial.epochs())
    out["reserved_peak"] = torch.cuda.max_memory_reserved()
    print(json.dumps(out))
""")


def test_a_trial_over_its_allocator_cap_runs_out_of_memory_and_says_so():
    """In a process of its own: the allocator cap lasts for the process."""
    r = subprocess.run([sys.executable, "-c", OOM_CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["plain"] == "OutOfMemoryError"
    rec = out["record"]
    assert rec["status"] == OOM and "out of memory" in rec["error"].lower(), rec
    assert out["reserved_peak"] <= out["cap_bytes"] + 64 * 2**20  # the cap held (allocator rounding aside)


def _cuda_compile_works() -> str:
    try:
        torch.compile(lambda x: (x * 2).sin())(torch.ones(4, device="cuda"))
        return ""
    except Exception as e:  # no Triton, no C compiler, ...
        return f"torch.compile does not work on CUDA here: {type(e).__name__}: {str(e)[:200]}"


def test_compile_on_cuda_changes_no_number(small_synthetic):
    why = _cuda_compile_works()
    if why:
        pytest.fail(why)  # on a GPU machine a broken compile is a finding, not a skip
    # 512 training images in batches of 64 and 256 test images: one batch shape each, so one compile each.
    data = smaller(small_synthetic, 512, 256)
    spec = bf16(TrialSpec(TINY_VIT, dataclasses.replace(default_recipe("seed", TINY_VIT), epochs=2),
                          DataSpec("synthetic", train_size=512, test_size=256)))
    eager, compiled = run(spec, data), run(dataclasses.replace(spec, compile=True), data)
    assert compiled[0]["compiled"] and compiled[0]["compile_time_s"] > 0 and compiled[1]["compile_time_s"] == 0.0
    for c, e in zip(compiled, eager):
        # bf16 keeps 8 significant bits (a rounding is up to 0.4%); inductor's fused kernels round intermediates
        # at other points than eager's, and two epochs of steps compound that: equal within 2% for the losses
        # and 3 points of accuracy (8 of 256 test images).
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=2e-2)
        assert c["test_loss"] == pytest.approx(e["test_loss"], rel=2e-2)
        assert c["test_acc"] == pytest.approx(e["test_acc"], abs=0.03)


def test_smoke_grid_on_one_gpu_packs_trials_by_their_fractions_on_cuda(tmp_path):
    r = run_grid("--gpus", 1, "--results-dir", tmp_path, "--name", "smoke", "--no-analysis", "--no-dashboard")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    epochs = pd.read_parquet(tmp_path / "smoke" / "epochs.parquet")
    trials = pd.read_parquet(tmp_path / "smoke" / "trials.parquet").set_index("trial")
    assert (trials.status == "ok").all(), trials.status
    assert (epochs.device == torch.cuda.get_device_name(0)).all() and (epochs.gpu_ids == "0").all()
    assert (trials.gpu_fraction < 1).all()  # every smoke trial gets a share, not the whole GPU
    spans = epochs.groupby("trial").agg(start=("started_at", "min"), end=("finished_at", "max"))
    assert max_at_once(list(zip(spans.start, spans.end))) >= 2, spans  # packed: trials ran side by side
    # each trial stayed under its allocator cap: its share of this GPU less the CUDA context's room
    from raybench.sizing import CUDA_OVERHEAD_BYTES
    total = torch.cuda.get_device_properties(0).total_memory
    cap_mb = (trials.gpu_fraction * total - CUDA_OVERHEAD_BYTES) / 2**20
    assert (epochs.groupby("trial").peak_memory_mb.max() <= cap_mb).all()
