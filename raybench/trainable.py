"""One TrialSpec as a Ray Tune class trainable: one `step` per epoch, Tune's checkpoints hold the Trial's state.

Imported by Ray workers (and by the grid when it builds the Tuner), never by `import raybench.grid` alone.
"""
from __future__ import annotations

from pathlib import Path

import ray
import torch
from ray import tune

from raybench.configs import TrialSpec
from raybench.records import OK, RUNNING
from raybench.resources import allocator_fraction
from raybench.train import Trial


class StudyTrial(tune.Trainable):
    """`config["trial"]` is one entry of the grid's param space: name, spec (TrialSpec.to_dict), resources
    ({"cpu", "gpu"}) and memory_bytes (the estimate its GPU share came from). `__repr__` is the trial name,
    which Ray shows for the actor in its dashboard and log prefixes (a function trainable shows as
    `ImplicitFunc`)."""

    def setup(self, config: dict):
        self.trial = self._build(config["trial"])
        self.node_id = ray.get_runtime_context().get_node_id()
        self.records = None  # the epoch iterator starts at the first step, after any checkpoint load

    @staticmethod
    def _build(entry: dict) -> Trial:
        spec = TrialSpec.from_dict(entry["spec"])
        res = entry["resources"]
        use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if use_cuda and res["gpu"] < 1:  # before the trial allocates anything
            torch.cuda.set_per_process_memory_fraction(allocator_fraction(
                spec.name, entry["memory_bytes"], res["gpu"], torch.cuda.get_device_properties(0).total_memory))
        return Trial(spec, device="cuda" if use_cuda else "cpu", threads=max(1, int(res["cpu"])))

    def step(self) -> dict:
        if self.records is None:
            self.records = self.trial.epochs()
        rec = next(self.records, None)
        if rec is None:  # restored from the checkpoint of its last epoch: it has ended, say how
            rec = {"epoch": self.trial.epoch,
                   "status": OK if self.trial.status == RUNNING else self.trial.status}
        rec.update(node_id=self.node_id, gpu_ids=",".join(map(str, ray.get_gpu_ids())),
                   done=rec["status"] != RUNNING)
        return rec

    def save_checkpoint(self, checkpoint_dir: str):
        self.trial.save(Path(checkpoint_dir) / "state.pt")

    def load_checkpoint(self, checkpoint_dir: str):
        self.trial.load(Path(checkpoint_dir) / "state.pt")

    def __repr__(self):
        return self.trial_name or "raybench-trial"
