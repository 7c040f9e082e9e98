"""The run's Parquet files, written by a Ray Tune callback on the driver as results arrive.

Every event re-reads the files, merges and rewrites them atomically (temporary file + rename): the state
lives on disk, not in the callback, because Tune restores a callback as it was when the Tuner was built.
Rows are keyed on (trial, epoch) and trial, so a retried or resumed trial that reports an epoch again
replaces the row instead of adding one. See docs/results.md for the columns.
"""
from __future__ import annotations

import logging
import math
import os
import traceback
from pathlib import Path

import pandas as pd
from ray import tune

from raybench import estimate
from raybench.configs import TrialSpec
from raybench.recover import DiskFull, write_atomic
from raybench.records import (EPOCH_COLUMNS, ERROR, OK, PENDING, RUNNING, STOPPED_EARLY, UNFINISHED, epoch_summary,
                              versions)

# What a run ends with when nothing failed: every trial finished, or stopped by the scheduler (ASHA).
ENDED_WELL = (OK, STOPPED_EARLY)

def trial_rows(specs: list[TrialSpec], resources: dict[str, dict], commit: str = "") -> list[dict]:
    """One row per trial with everything known before training: config, complexity, resources, provenance."""
    from raybench.complexity import complexity
    from raybench.models import FAMILIES, family_of
    rows, ver = [], versions()
    for s in specs:
        m, cx = s.model, complexity(s.model)
        # every family's own columns (ViT knobs, ResNet stem, Swin size), filled by the trial's family
        own = {col: None for f in FAMILIES.values() for col in f.columns}
        own.update({col: value(m) for col, value in family_of(m).columns.items()})
        rows.append({
            "trial": s.name, "model": m.name, "family": m.family, "recipe": s.recipe.name, "seed": s.seed, **own,
            "pretrained": bool(getattr(m, "pretrained", False) or m.frozen_backbone),
            "finetune": m.frozen_backbone,
            "params": cx.params, "trainable_params": cx.trainable_params, "flops": float(cx.flops),
            "flops_source": cx.flops_source,
            "gflops": cx.gflops, "image_size": cx.input_size,
            "batch_size": s.recipe.batch_size, "lr": s.recipe.lr, "optimizer": s.recipe.optimizer,
            "epochs": s.recipe.epochs,
            "gpu_fraction": float(resources[s.name]["gpu"]), "cpus": float(resources[s.name]["cpu"]),
            # every attempt's share, in order: an out-of-memory trial is re-queued with twice its share
            "gpu_shares": f"{float(resources[s.name]['gpu']):g}",
            "device": "", "precision": s.precision, "dataset": s.data.name, "data_dir": s.data.data_dir or "", "synthetic": s.data.name == "synthetic",
            "status": PENDING, "error": "", "epochs_done": 0, "final_test_acc": math.nan,
            "best_test_acc": math.nan, "test_acc_at_10": math.nan, "mean_epoch_time_s": math.nan,
            "total_time_s": math.nan, "predicted_time_s": math.nan, **ver, "git_commit": commit})
    return rows


# Where Tune failed to write for want of space (its experiment-state sync only logs the error, once a second):
# filled by DiskFullLog, read by ResultsWriter, which then stops the run.
_disk_full: list[str] = []


class DiskFullLog(logging.Filter):
    """On the handlers of Ray's loggers: a record saying the disk is full is noted (the run stops at the next
    step) and not printed, since raybench says it once, with what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (record.exc_text or "") + (
            "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else "")
        if "No space left on device" in text or "[Errno 28]" in text:
            _disk_full.append(text)
            return False
        return True


def watch_ray_logs_for_a_full_disk() -> None:
    _disk_full.clear()  # a run before, in this process, is no concern of this one
    log = logging.getLogger("ray")
    for handler in [*log.handlers, *logging.getLogger().handlers]:
        if not any(isinstance(f, DiskFullLog) for f in handler.filters):
            handler.addFilter(DiskFullLog())


# Set by the driver (raybench.grid) to the run folder it found. Tune restores this callback as it was pickled
# when the run began, so a run folder moved between a stop and --resume would be written at its old path.
RUN_DIR_ENV = "RAYBENCH_GRID_RUN_DIR"


class ResultsWriter(tune.Callback):
    def __init__(self, run_dir: Path, initial_rows: list[dict], recount: bool = False):
        """`recount`: the epoch rows were rebuilt (raybench.recover), so every trial's summary is recomputed."""
        self._use(Path(run_dir))
        new = pd.DataFrame(initial_rows)
        rebuild = not self.trials_path.exists() and self.epochs_path.exists()
        if self.trials_path.exists():  # a resumed run keeps what it learnt about its trials
            old = pd.read_parquet(self.trials_path)
            new = pd.concat([old, new[~new.trial.isin(old.trial)]], ignore_index=True)
        write_atomic(new, self.trials_path)
        if rebuild or recount:  # a file was set aside (raybench.recover): each trial's row from its epoch rows
            ep = self._epochs()
            for name, mine in ep.sort_values("epoch").groupby("trial"):
                if name in set(new.trial):
                    self._update_trial(name, ep, **({"status": mine.status.iloc[-1]} if rebuild else {}))

    def _use(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.epochs_path, self.trials_path = run_dir / "epochs.parquet", run_dir / "trials.parquet"

    def setup(self, **info):
        if os.environ.get(RUN_DIR_ENV):
            self._use(Path(os.environ[RUN_DIR_ENV]))

    # --- files ---
    def _epochs(self) -> pd.DataFrame:
        return pd.read_parquet(self.epochs_path) if self.epochs_path.exists() else pd.DataFrame(columns=EPOCH_COLUMNS)

    def _update_trial(self, name: str, epochs: pd.DataFrame | None = None, **fields) -> None:
        """Set `fields` on the trial's row and recompute its summary from `epochs` (read when not given)."""
        trials = pd.read_parquet(self.trials_path)
        i = trials.index[trials.trial == name]
        ep = self._epochs() if epochs is None else epochs
        ep = ep[ep.trial == name].sort_values("epoch")
        if len(ep):
            s = epoch_summary(ep).loc[name]
            fields.update(epochs_done=int(s.epochs_done), final_test_acc=float(s.final_test_acc),
                          best_test_acc=float(s.best_test_acc), test_acc_at_10=float(s.test_acc_at_10),
                          mean_epoch_time_s=float(s.mean_epoch_time_s), total_time_s=float(s.total_time_s),
                          device=str(ep.device.iloc[-1]))
            fields["precision"] = ep.precision.iloc[-1]  # the setting as the device resolved it
        for k, v in fields.items():
            trials.loc[i, k] = v
        write_atomic(trials, self.trials_path)

    # --- Tune events ---
    def on_step_end(self, iteration, trials, **info):
        if _disk_full:  # Tune could not write its state: stop while the Parquet files are whole
            raise DiskFull(trials[0].path if trials and getattr(trials[0], "path", None) else self.run_dir)

    def _check_disk(self, trial) -> None:
        """A trial that failed for want of disk space is not retried: every retry would fail the same way."""
        if trial.error_file and Path(trial.error_file).exists():
            last = Path(trial.error_file).read_text(errors="replace").rsplit("Failure # ", 1)[-1]
            if "No space left on device" in last or "[Errno 28]" in last:
                raise DiskFull(getattr(trial, "path", None) or self.run_dir)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        name = trial.config["trial"]["name"]
        ep = None
        if "train_loss" in result:  # an epoch; an OOM record carries only its status
            row = {k: result.get(k) for k in EPOCH_COLUMNS}
            row["trial"] = name
            ep = self._epochs()
            ep = pd.concat([ep[~((ep.trial == name) & (ep.epoch == row["epoch"]))], pd.DataFrame([row])],
                           ignore_index=True).sort_values(["trial", "epoch"]).astype({"epoch": int})
            write_atomic(ep, self.epochs_path)
            epochs = trial.config["trial"]["spec"]["recipe"]["epochs"]
            line = (f"[grid] {name:<36} epoch {row['epoch']:>3}/{epochs}  test acc {100 * row['test_acc']:5.1f}%"
                    f"  epoch {row['train_time_s']:.1f}s  ({row['device']}"
                    + (", synthetic data)" if trial.config["trial"]["spec"]["data"]["name"] == "synthetic" else ")"))
            estimate.show_epoch(line, self.run_dir, name, row["epoch"], epochs, estimate.read(self.run_dir), ep,
                                {t.config["trial"]["name"] for t in trials if t.status == "RUNNING"},
                                ended=result.get("status", RUNNING) != RUNNING)
        if result.get("note"):  # what the trial did on its own (raybench.trainable: a checkpoint that did not load)
            print(f"[grid] {name}: {result['note']}", flush=True)
        status = result.get("status", RUNNING)
        self._update_trial(name, ep, status=status, error=result.get("error", ""))
        if status not in (OK, RUNNING):
            print(f"[grid] {name}: {status.upper()}: {result.get('error', '')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check_disk(trial)
        name = trial.config["trial"]["name"]
        err = ""
        if trial.error_file and Path(trial.error_file).exists():
            lines = [l for l in Path(trial.error_file).read_text().splitlines() if l.strip()]
            err = lines[-1] if lines else ""
        self._update_trial(name, status=ERROR, error=err[:2000])
        print(f"[grid] {name}: ERROR: {err}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        """A trial Tune ended while its last record still said running: the scheduler stopped it early."""
        name = trial.config["trial"]["name"]
        row = pd.read_parquet(self.trials_path).set_index("trial").loc[name]
        if row.status == RUNNING:
            self._update_trial(name, status=STOPPED_EARLY)
            print(f"[grid] {name}: stopped early by the scheduler after {row.epochs_done}/{row.epochs} epochs",
                  flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check_disk(trial)
        name = trial.config["trial"]["name"]
        share = float(trial.placement_group_factory.required_resources.get("GPU", 0.0))
        t = pd.read_parquet(self.trials_path)
        shares = str(t.loc[t.trial == name, "gpu_shares"].iloc[0]) if "gpu_shares" in t else ""
        if share != float(t.loc[t.trial == name, "gpu_fraction"].iloc[0]):  # re-queued with a larger share
            self._update_trial(name, gpu_fraction=share, gpu_shares=f"{shares},{share:g}".strip(","))
            print(f"[grid] {name}: out of GPU memory; retrying from its last checkpoint with GPU share {share:g}",
                  flush=True)
        else:
            print(f"[grid] {name}: failed, retrying from its last checkpoint", flush=True)

    # --- the end ---
    def summary(self) -> str:
        t = pd.read_parquet(self.trials_path)
        lines = [f"[grid] {len(t)} trials: " + ", ".join(f"{n} {s}" for s, n in t.status.value_counts().items())
                 + (" (accuracies on synthetic data)" if t.synthetic.any() else "")]
        for r in t.itertuples():
            acc = "" if math.isnan(r.final_test_acc) else f"final test acc {100 * r.final_test_acc:5.1f}%"
            pred = getattr(r, "predicted_time_s", math.nan)
            time_s = "" if pd.isna(pred) or pd.isna(r.total_time_s) else (
                f"  time {estimate.fmt_s(r.total_time_s)} (predicted {estimate.fmt_s(pred)})")
            lines.append(f"[grid]   {r.trial:<40} {r.status:<9} {r.epochs_done:>3}/{r.epochs} epochs  {acc}{time_s}")
        return "\n".join(lines)

    def unfinished(self) -> list[str]:
        t = pd.read_parquet(self.trials_path)
        return t.trial[t.status.isin(UNFINISHED)].tolist()

    def all_ok(self) -> bool:
        """Every trial finished or was stopped by the scheduler: neither is a failure."""
        return bool(pd.read_parquet(self.trials_path).status.isin(ENDED_WELL).all())


def mlflow_callback(tracking_uri: str, experiment_name: str):
    """Ray's MLflowLoggerCallback, one MLflow run per trial: params are the trial's config flattened
    (trial/spec/model/dim, trial/spec/recipe/lr, ...), metrics every epoch record's numbers at step = epoch;
    tags say the trial's model family, its data ("synthetic" where it is) and, at the end, its status."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialRuns(MLflowLoggerCallback):
        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            self._status = {}

        def log_trial_start(self, trial):
            spec = TrialSpec.from_dict(trial.config["trial"]["spec"])
            self.tags = {"model_family": spec.model.family, "model": spec.model.name, "recipe": spec.recipe.name,
                         "data": spec.data.name, "raybench_trial": trial.config["trial"]["name"]}
            super().log_trial_start(trial)

        def log_trial_result(self, iteration, trial, result):
            self._status[trial] = result.get("status", RUNNING)
            super().log_trial_result(iteration, trial, result)

        def log_trial_end(self, trial, failed: bool = False):
            status = ERROR if failed else self._status.get(trial, RUNNING)
            if status == RUNNING:  # Tune ended it before its last epoch: the scheduler did (as in trials.parquet)
                status = STOPPED_EARLY
            from mlflow.tracking import MlflowClient
            MlflowClient(self.tracking_uri).set_tag(self._trial_runs[trial], "status", status)
            super().log_trial_end(trial, failed)

    return TrialRuns(tracking_uri=tracking_uri, experiment_name=experiment_name)
