"""CPU trials take the CPUs that finished trials free, at an epoch boundary.

Without it, a study's last long CPU trial runs its remaining epochs on its own CPUs (one thread, by default)
while the cores of every finished trial sit idle. Tune's ResourceChangingScheduler does this kind of thing but
refuses trials with different resources and actor reuse, both of which raybench has, so this is a small
scheduler of its own around the run's scheduler: after an epoch of a CPU-only trial, when no trial is waiting
for resources and whole CPUs are free, the trial is paused (Tune checkpoints it) and resumed from that
checkpoint with those CPUs added; its trainer takes one torch thread per CPU (raybench.trainable), and every
epoch record says its thread count. Only on a single-node Ray (the local one): on a cluster the free CPUs may be
on another node than the trial's.
"""
from __future__ import annotations

import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler


def extra_cpus(free_cpus: float, trial_cpus: float, node_cpus: float, epochs_left: int, epoch_s: float,
               waiting: int, min_epoch_s: float) -> int:
    """Whole CPUs to add to a CPU trial after an epoch: the free ones (up to the node's), when nothing waits for
    them and the epochs left are long enough to pay for the restart (`min_epoch_s`: the grid's
    --grow-min-epoch-s; a pause and resume costs a new actor, the data on the device again and a feature pass)."""
    if waiting or epochs_left < 1 or epoch_s < min_epoch_s:
        return 0
    return max(0, int(math.floor(min(free_cpus, node_cpus - trial_cpus) + 1e-9)))


class CpuGrowth(TrialScheduler):
    """Wraps the run's scheduler (see the module's docstring)."""

    def __init__(self, base, min_epoch_s: float):
        super().__init__()
        self.base, self.min_epoch_s = base, min_epoch_s
        self.grow: dict = {}  # trial -> its new resources, set once it is no longer running

    @property
    def metric(self):
        return self.base.metric

    @property
    def supports_buffered_results(self):
        return self.base.supports_buffered_results

    def set_search_properties(self, metric, mode, **spec):
        return self.base.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial):
        return self.base.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.grow.pop(trial, None)
        return self.base.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        decision = self.base.on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.CONTINUE or result.get("done") or "train_time_s" not in result:
            return decision
        import ray
        held = dict(trial.placement_group_factory.required_resources)
        if held.get("GPU", 0) > 0:
            return decision
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) != 1:
            return decision
        trials = tune_controller.get_trials()
        waiting = sum(t.status in (Trial.PENDING, Trial.PAUSED) for t in trials if t is not trial)
        epochs_left = int(trial.config["trial"]["spec"]["recipe"]["epochs"]) - int(result.get("epoch", 0))
        epoch_s = float(result["train_time_s"]) + float(result.get("eval_time_s") or 0.0)
        add = extra_cpus(ray.available_resources().get("CPU", 0.0), held.get("CPU", 1.0),
                         nodes[0]["Resources"].get("CPU", 0.0), epochs_left, epoch_s, waiting, self.min_epoch_s)
        if not add:
            return decision
        new = {k.lower() if k in ("CPU", "GPU") else k: v for k, v in held.items()}
        new["cpu"] = held.get("CPU", 1.0) + add
        self.grow[trial] = new
        print(f"[grid] {trial.config['trial']['name']}: {add:g} CPU(s) free and nothing waiting; it goes on "
              f"with {new['cpu']:g} CPUs (threads) from its next epoch", flush=True)
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial, result):
        self.grow.pop(trial, None)
        return self.base.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self.grow.pop(trial, None)
        return self.base.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        for trial, new in list(self.grow.items()):
            if trial.status != Trial.RUNNING:  # Tune refuses to change a running trial's resources
                trial.update_resources(new)
                del self.grow[trial]
        return self.base.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"(CpuGrowth) {self.base.debug_string()}"

    def save(self, checkpoint_path: str):
        return self.base.save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        return self.base.restore(checkpoint_path)
