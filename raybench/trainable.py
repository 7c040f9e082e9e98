"""One TrialSpec as a Ray Tune class trainable: one `step` per epoch, Tune's checkpoints hold the Trial's state.

Imported by Ray workers (and by the grid when it builds the Tuner), never by `import raybench.grid` alone.
With `reuse_actors` (raybench.grid.reuse_actors: where no dashboard shows the trials) an actor process that
finished a trial is handed the next one through `reset_config`, so importing torch and the model code
(transformers for Swin) is paid once per process.
"""
from __future__ import annotations

import gc
import os
import pickle
import sys
from pathlib import Path

import ray
import torch
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raybench.configs import TrialSpec
from raybench.records import OK, OOM, RUNNING
from raybench.sizing import allocator_fraction, next_share
from raybench.train import Trial

class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory below a whole GPU: Tune retries it from its last checkpoint, and
    OomRequeue gives the retry twice the share (raybench.sizing.next_share)."""


# The dataset of the last trial this process built, by (DataSpec, classes, input side): a reused actor's next
# trial on the same data skips generating or reading it again (it is never written to: batches are copies).
_datasets: dict = {}


def dataset_for(spec: TrialSpec):
    from raybench.data import load_dataset
    from raybench.sizing import input_side
    key = (spec.data, spec.model.num_classes, input_side(spec))
    if key not in _datasets:
        _datasets.clear()  # one dataset held at a time: CIFAR-100 is 180 MB
        _datasets[key] = load_dataset(spec.data, spec.model.num_classes, input_side(spec))
    return _datasets[key]


# What Ray's log monitor takes as a new name for the lines an actor prints after it (ray_constants).
LOG_PREFIX_ACTOR_NAME = ":actor_name:"


class StudyTrial(tune.Trainable):
    """`config["trial"]` is one entry of the grid's param space: name, spec (TrialSpec.to_dict), resources
    ({"cpu", "gpu"}) and memory_bytes (the estimate its GPU share came from). `__repr__` is the first trial's
    name, which Ray shows for the actor in its dashboard (a function trainable shows as `ImplicitFunc`); Ray
    2.60 reads it once, when the actor is created, so a reused actor keeps it there, while its log lines
    carry the name of the trial it runs now (see `_announce`)."""

    def setup(self, config: dict):
        self._start(config)
        if config["trial"].get("resume_dir"):  # a run restarted from raybench's records (raybench.recover)
            self._resume_newest(config["trial"]["resume_dir"], None, "its run went on without Tune's state")

    def reset_config(self, new_config: dict) -> bool:
        """The next trial in this process: nothing of the last one (model, data, optimiser, compiled graphs,
        GPU memory cap and peak statistics) may change its numbers."""
        self.trial = self.records = None
        gc.collect()
        if "torch._dynamo" in sys.modules:  # a trial compiled: drop its graphs and guards (never a stale one).
            torch._dynamo.reset()  # Without a compile there is nothing to drop, and importing dynamo takes seconds.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)  # _build sets the next trial's cap, if it has one
            torch.cuda.reset_peak_memory_stats()
        self._start(new_config)
        self._announce()
        return True

    def _start(self, config: dict) -> None:
        self.trial = self._build(config["trial"])
        self.node_id = ray.get_runtime_context().get_node_id()
        self.records = None  # the epoch iterator starts at the first step, after any checkpoint load

    def _announce(self) -> None:
        """Ray names an actor's log lines after the last `:actor_name:` line it printed (its log monitor
        reads them from the worker's .out/.err files), so a reused actor's lines carry the current trial."""
        for stream in (sys.stdout, sys.stderr):
            print(f"{LOG_PREFIX_ACTOR_NAME}{self.trial_name}", file=stream, flush=True)

    def _share(self, entry: dict) -> float:
        """The GPU share this attempt holds: an OOM re-queue changes it, and the config keeps the first one."""
        held = self.trial_resources.required_resources if self.trial_resources else entry["resources"]
        return float(held.get("GPU", held.get("gpu", 0.0)))

    def _build(self, entry: dict) -> Trial:
        spec = TrialSpec.from_dict(entry["spec"])
        self.share = self._share(entry)
        use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if use_cuda and self.share < 1:  # before the trial allocates anything
            torch.cuda.set_per_process_memory_fraction(allocator_fraction(
                spec.name, entry["memory_bytes"], self.share, torch.cuda.get_device_properties(0).total_memory))
        held = self.trial_resources.required_resources if self.trial_resources else entry["resources"]
        cpus = held.get("CPU", held.get("cpu", 1))  # raybench.rescale may have added CPUs since the config
        return Trial(spec, device="cuda" if use_cuda else "cpu", threads=max(1, int(cpus)), dataset=dataset_for(spec))

    def step(self) -> dict:
        if self.records is None:
            self.records = self.trial.epochs()
        rec = next(self.records, None)
        if rec is None:  # restored from the checkpoint of its last epoch: it has ended, say how
            rec = {"epoch": self.trial.epoch,
                   "status": OK if self.trial.status == RUNNING else self.trial.status}
        if rec["status"] == OOM and self.share < 1:
            raise TrialOutOfMemory(f"{self.trial.spec.name}: out of GPU memory in epoch {rec['epoch']} with GPU share "
                                   f"{self.share:g} ({rec.get('error', '')}); re-queued with {next_share(self.share):g}")
        rec.update(node_id=self.node_id, gpu_ids=",".join(map(str, ray.get_gpu_ids())), gpu_share=self.share,
                   done=rec["status"] != RUNNING)
        if getattr(self, "note", ""):
            rec["note"], self.note = self.note, ""
        return rec

    def save_checkpoint(self, checkpoint_dir: str):
        self.trial.save(Path(checkpoint_dir) / "state.pt")

    def load_checkpoint(self, checkpoint_dir: str):
        self.trial.load(Path(checkpoint_dir) / "state.pt")

    def restore(self, checkpoint_path):
        """Tune's restore; a checkpoint that is gone or does not load is not the end of the trial: it goes on
        from the newest checkpoint in its folder that loads, else from epoch 1 (redone epochs replace their rows,
        which are keyed on (trial, epoch))."""
        try:
            return super().restore(checkpoint_path)
        except Exception as e:
            ckpt = getattr(checkpoint_path, "checkpoint", checkpoint_path)
            path = getattr(ckpt, "path", str(ckpt))
            fs = getattr(ckpt, "filesystem", None)
            self._resume_newest(os.path.dirname(path.rstrip("/")), fs,
                                f"its checkpoint {path} could not be restored ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})")

    def _resume_newest(self, trial_dir: str, fs, why: str) -> None:
        import pyarrow.fs as pafs
        fs = fs or pafs.LocalFileSystem()
        try:
            infos = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
        except OSError:
            infos = []
        best, best_path = None, None
        for info in infos:
            if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            try:
                with tune.Checkpoint(info.path, filesystem=fs).as_directory() as d:
                    state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
            except Exception:  # gone or cut short too
                continue
            if best is None or int(state["epoch"]) > int(best["epoch"]):
                best, best_path = state, info.path
        if best is not None:
            self.trial.load_state_dict(best)
            how = f"goes on from the checkpoint of epoch {self.trial.epoch} ({best_path})"
        else:  # nothing loads: a fresh start, with nothing of a half-applied load left
            self.trial = self._build(self.config["trial"])
            how = "starts again from epoch 1 (no checkpoint of it loads)"
        self.records = None
        self._iteration = self.trial.epoch  # Tune's iteration count is the epoch (ASHA's rungs read it)
        self.note = f"{why}; it {how}"  # told with the next record (the driver prints no worker output)

    def __repr__(self):
        return self.trial_name or "raybench-trial"


class OomRequeue:
    """Mixed into the run's scheduler (FifoOomRequeue, AshaOomRequeue): a trial that failed with
    TrialOutOfMemory is retried (Tune's failure handling restores it from its last checkpoint) with twice its GPU
    share, up to a whole GPU, and the OOM does not count against --max-failures. Tune's
    ResourceChangingScheduler does this for results, not failures, and refuses actor reuse."""

    def on_trial_error(self, tune_controller, trial):
        if _failed_with_oom(trial):
            share = float(trial.placement_group_factory.required_resources.get("GPU", 0.0))
            resources = dict(trial.placement_group_factory.required_resources)
            resources["GPU"] = next_share(share)
            trial.update_resources({k.lower() if k in ("CPU", "GPU") else k: v for k, v in resources.items()})
            trial.run_metadata.num_failures -= 1  # a re-queue, not a failure
        return super().on_trial_error(tune_controller, trial)


class FifoOomRequeue(OomRequeue, FIFOScheduler):
    """Every trial to its last epoch, in the order added; OOMs re-queued."""


class AshaOomRequeue(OomRequeue, ASHAScheduler):
    """ASHA's early stopping; OOMs re-queued."""


def _failed_with_oom(trial) -> bool:
    """Tune pickles the exception of each failure beside the trial (Trial.handle_error, before the scheduler
    hears of it): a RayTaskError that is also an instance of its cause."""
    path = trial.pickled_error_file
    if not path or not os.path.exists(path):
        return False
    try:
        with open(path, "rb") as f:
            error = cloudpickle.load(f)
    except (OSError, EOFError, ImportError, AttributeError, pickle.UnpicklingError):  # a class the driver lacks
        return False
    return isinstance(error, TrialOutOfMemory) or isinstance(getattr(error, "cause", None), TrialOutOfMemory)
