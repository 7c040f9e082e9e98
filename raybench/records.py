"""The vocabulary every record shares, defined once: the run folder's schema version, trial statuses, the epoch
record's columns, the time columns a trial's cost is summed from, per-trial figures from epoch rows, and
provenance.

Imports only pandas (and, when provenance is asked for, torch/ray/transformers), so the Tune callback on the
driver, the trainer, the bench and the analysis can all use it without loading each other.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

# --- the line a trial prints while a long epoch runs -----------------------------------------------------------
# Printed in the trial's process; the driver forwards these lines, and no other output of Ray's workers, to its
# own (raybench.session.forward_step_notes).
STEP_NOTE = re.compile(r"^\[[^\]\s]+\] epoch \d+/\d+: step \d+/\d+, ")


def step_note(trial: str, epoch: int, epochs: int, steps: int, steps_per_epoch: int, elapsed_s: float,
              left_s: float) -> str:
    return (f"[{trial}] epoch {epoch}/{epochs}: step {steps}/{steps_per_epoch}, {elapsed_s:.0f}s in, about "
            f"{left_s:.0f}s of training left in the epoch")


# --- the run folder's schema (docs/results.md, "Schema") -----------------------------------------------------
# The layout of experiment.json, epochs.parquet and trials.parquet this raybench writes and reads. Declared in
# experiment.json ("schema") and in each Parquet file's metadata (SCHEMA_KEY); a folder that declares none
# (written by hand, or by another tool) is read as this one.
SCHEMA = 1
SCHEMA_KEY = b"raybench.schema"


class SchemaError(ValueError):
    """A run folder declares a schema this raybench does not read."""


def check_schema(declared, where) -> None:
    """Refuse a declared schema other than SCHEMA; None (nothing declared) is read as SCHEMA."""
    if declared is not None and str(declared) != str(SCHEMA):
        raise SchemaError(f"{where} declares run-folder schema {declared!r}; this raybench reads schema {SCHEMA} "
                          "only (docs/results.md, \"Schema\")")


def write_parquet(df: pd.DataFrame, path) -> None:
    """`df` as Parquet with the schema declared in the file's metadata (beside pandas' own)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_KEY: str(SCHEMA).encode()}),
                   path)


def parquet_schema(path) -> str | None:
    """The schema a Parquet file declares, or None."""
    import pyarrow.parquet as pq
    declared = (pq.read_schema(path).metadata or {}).get(SCHEMA_KEY)
    return None if declared is None else declared.decode(errors="replace")


# --- statuses: a trial's, after its latest record --------------------------------------------------------
PENDING = "pending"  # not started yet (trials.parquet only)
RUNNING = "running"
OK = "ok"
DIVERGED = "diverged"
OOM = "oom"
ERROR = "error"  # raised in the trial; Tune's error file holds the traceback
STOPPED_EARLY = "stopped-early"  # a scheduler (ASHA) ended it: kept, but not a finished trial
UNFINISHED = (PENDING, RUNNING)
FAILED = (DIVERGED, OOM, ERROR)
UNKNOWN = "unknown"  # the analysis' word for a trials.parquet row without a status (hand-made, damaged)
PARTIAL = "partial"  # the analysis' status of a configuration shown from unfinished trials (never a trial's)

# --- the epoch record (one row of epochs.parquet; docs/results.md) ---------------------------------------
# The seconds a trial spends, by what they buy: the training steps (the per-epoch figure), evaluation, the
# frozen backbone's one-off feature pass, and the one-off compile warm-up.
TIME_COLUMNS = ("train_time_s", "eval_time_s", "cache_time_s", "compile_time_s")
EPOCH_COLUMNS = ("trial", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", *TIME_COLUMNS[:2],
                 "images_per_s", "peak_memory_mb", "lr", "status", "device", "precision", "threads", "node_id",
                 "gpu_ids", "gpu_share", "pid", "started_at", "finished_at", *TIME_COLUMNS[2:], "feature_cache", "compiled",
                 "num_classes", "train_images", "test_images")


def epoch_summary(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per-trial figures from epoch rows, indexed by trial: the one definition behind trials.parquet's summary
    columns (raybench.results) and the analysis tables."""
    ep = epochs.sort_values(["trial", "epoch"])
    # One-off costs (a frozen backbone's feature pass, compile warm-up) are a trial's time too.
    extra = sum(ep[c].fillna(0.0) for c in TIME_COLUMNS[1:])
    ep = ep.assign(_total=ep["train_time_s"] + extra)
    g = ep.groupby("trial")
    return pd.DataFrame({
        "epochs_done": g.size(),
        "last_epoch": g["epoch"].max(),
        "final_test_acc": g.tail(1).set_index("trial")["test_acc"],
        "best_test_acc": g["test_acc"].max(),
        "test_acc_at_10": ep[ep["epoch"] == 10].set_index("trial")["test_acc"],
        "mean_epoch_time_s": g["train_time_s"].mean(),
        "total_time_s": g["_total"].sum(),
    })


# --- provenance --------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict:
    """The library versions every trial row carries (the driver's: workers are expected to match)."""
    from importlib.metadata import version

    import ray
    import torch
    # the installed version from its metadata: importing transformers costs a driver that builds no Hugging Face
    # model half a second
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda or "",
            "ray_version": ray.__version__, "transformers_version": version("transformers")}


def machine_info() -> dict:
    """Provenance of a benchmark: CPU model, cores, GPU, versions, commit, and how loaded the machine was."""
    import torch
    import torchvision
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"hostname": platform.node(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
            "cuda_version": torch.version.cuda or "", "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "python_version": platform.python_version(),
            "platform": platform.platform(), "git_commit": git_commit(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
