"""A run folder in, the frames every table, plot and sentence is made from out.

trials.parquet says what each trial is (model, family, knobs, params, FLOPs, status, error); the per-trial
metrics (final/best accuracy, accuracy after 10 epochs, mean epoch time) are recomputed from the epoch rows,
because epochs.parquet is written as results arrive while trials.parquet may lag a report behind. A trial
without epoch rows falls back to trials.parquet's own summary columns, and says so.

Model identity (stem, pretrained, frozen backbone, Swin size, where the FLOPs come from, precision) is read
from columns, so nothing downstream parses a model name. A folder that declares a schema other than the one
raybench writes (raybench.records.SCHEMA) is refused; one that declares none is read as that schema.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from raybench.analysis.diagnose import SEP, diagnose_trials, labels_of
from raybench.analysis.usage import shared_epochs, throughput
from raybench.records import (OK, PARTIAL, PENDING, RUNNING, STOPPED_EARLY, TIME_COLUMNS, UNKNOWN, check_schema,
                              epoch_summary, parquet_schema)

KNOBS = ("patch", "dim", "depth", "heads", "mlp_ratio")
METRICS = ("final_test_acc", "best_test_acc", "test_acc_at_10", "mean_epoch_time_s", "total_time_s")
# Per-trial facts the diagnose step derives (diagnose.py, usage.py), averaged over seeds like METRICS.
DERIVED = ("final_train_acc", "generalization_gap", "train_tflops", "tflops_share", "shared_epochs")
# Known class counts of the named datasets, for runs whose epoch rows do not record `num_classes`.
DATASET_CLASSES = {"cifar100": 100}
# What the analysis cannot do without; every other column is optional.
TRIAL_COLUMNS = ("trial", "model", "family", "recipe", "seed", *KNOBS, "stem", "pretrained", "finetune", "swin_size",
                 "params", "trainable_params", "flops", "flops_source", "image_size", "epochs", "device", "dataset",
                 "status", "error")
EPOCH_COLUMNS = ("trial", "epoch", "test_acc", *TIME_COLUMNS)
EXPECTED = "epochs.parquet and trials.parquet (written by `python -m raybench.grid`, see docs/results.md)"
BUILT_IN = ("vit", "resnet", "swin")  # families with closed-form complexity; any other string is a family too
# A configuration's identity: the same for all its seeds, carried from its first trial.
CONFIG_COLUMNS = ("model", "recipe", "family", *KNOBS, "stem", "pretrained", "finetune", "swin_size", "params",
                  "trainable_params", "flops", "gflops", "flops_source", "image_size", "epochs_planned", "dataset")


@dataclass(frozen=True, eq=False)
class Run:
    """One run folder, loaded. `per_trial` and `configs` are what the tables, plots and report are made from;
    the frames derived from them (knob matches, recipe pairs) are computed on first use and kept."""
    path: Path
    trials: pd.DataFrame  # trials.parquet as written
    epochs: pd.DataFrame  # epochs.parquet as written, sorted by (trial, epoch); empty when the file is missing
    per_trial: pd.DataFrame  # one row per trial: identity from trials.parquet, metrics from the epoch rows
    configs: pd.DataFrame  # one row per (model, recipe): means (and std) over its seeds
    missing: list[str] = field(default_factory=list)  # what the run lacks, one sentence each

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def label(self) -> str:
        """The data the numbers come from, as every title states it ("synthetic data", "CIFAR-100")."""
        return data_label(self.trials)

    @property
    def devices(self) -> list[str]:
        return sorted(d for d in self.trials["device"].fillna("").astype(str).unique() if d)

    @cached_property
    def families(self) -> list[str]:
        """The run's families, built-in ones first in the study's order, then the others alphabetically."""
        present = set(self.per_trial["family"])
        return [f for f in BUILT_IN if f in present] + sorted(present - set(BUILT_IN))

    def config_label(self, row) -> str:
        """A configuration's name as plots and sentences show it: the model, plus its recipe when the run has
        several recipes."""
        return row["model"] if self.configs["recipe"].nunique() <= 1 else f"{row['model']} ({row['recipe']})"

    def done(self, family: str | None = None) -> pd.DataFrame:
        """Complete configurations (status ok, every planned epoch of a trial recorded, not diagnosed `diverged`
        or `not learning`), of one family if given: what every comparison is made from."""
        c = self.complete
        return c if family is None or c.empty else c[c["family"] == family]

    @cached_property
    def excluded(self) -> pd.DataFrame:
        """Trials diagnosed `diverged` or `not learning`: named by the report, compared with nothing."""
        return self.per_trial[self.per_trial["excluded"]]

    @cached_property
    def complete(self) -> pd.DataFrame:
        c = self.configs
        return c[(c["status"] == OK) & c["final_test_acc"].notna() & ~c["excluded"]] if len(c) else c

    @cached_property
    def knob_matches(self) -> dict[str, pd.DataFrame]:
        """For each ViT knob with >= 2 values among complete ViTs: those ViTs whose combination of the other
        knobs (and recipe) ran with every value of it, keyed by that combination (`_key`), so a partial grid
        compares like with like."""
        vit, out = self.done("vit"), {}
        for knob in KNOBS:
            values = vit[knob].dropna().unique() if len(vit) else []
            if len(values) < 2:
                continue
            others = [k for k in KNOBS if k != knob] + ["recipe"]
            key = vit[others].astype(str).agg("|".join, axis=1)
            n_values = vit.groupby(key)[knob].nunique()
            complete = key.map(n_values) == len(values)
            matched = vit[complete].assign(_key=key[complete])  # an empty selection must stay empty
            if len(matched):
                out[knob] = matched
        return out

    @cached_property
    def knob_effects(self) -> pd.DataFrame:
        """Per knob and value: mean accuracy and cost over the matched configurations (`knob_matches`)."""
        cols = ["knob", "value", "n_matched", "final_test_acc", "params", "gflops", "mean_epoch_time_s"]
        rows = []
        for knob, matched in self.knob_matches.items():
            means = matched.groupby(knob)[["final_test_acc", "params", "gflops", "mean_epoch_time_s"]].mean()
            n = len(matched) // matched[knob].nunique()
            rows += [{"knob": knob, "value": float(v), "n_matched": n, **r} for v, r in means.iterrows()]
        return pd.DataFrame(rows, columns=cols)

    @cached_property
    def recipe_pairs(self) -> pd.DataFrame:
        """Models that completed under both recipes, side by side."""
        cols = ["model", "family", "final_test_acc_seed", "final_test_acc_improved", "delta_points",
                "n_seed", "n_improved"]
        c = self.complete
        if c.empty:
            return pd.DataFrame(columns=cols)
        s, i = (c[c["recipe"] == r].set_index("model") for r in ("seed", "improved"))
        both = s.index.intersection(i.index)
        out = pd.DataFrame({"model": both, "family": s.loc[both, "family"].values,
                            "final_test_acc_seed": s.loc[both, "final_test_acc"].values,
                            "final_test_acc_improved": i.loc[both, "final_test_acc"].values,
                            "n_seed": s.loc[both, "n"].values, "n_improved": i.loc[both, "n"].values})
        out["delta_points"] = 100 * (out["final_test_acc_improved"] - out["final_test_acc_seed"])
        return out[cols].sort_values("delta_points", ascending=False).reset_index(drop=True)


def load_run(run_dir) -> Run:
    """Reads RUN_DIR/trials.parquet and RUN_DIR/epochs.parquet; raises FileNotFoundError/ValueError naming the
    folder and the files it expected when they are not there or not in the documented schema."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise FileNotFoundError(f"run folder {run_dir} {what}; expected a folder holding {EXPECTED}")
    trials_path, epochs_path = run_dir / "trials.parquet", run_dir / "epochs.parquet"
    if not trials_path.exists():
        hint = _runs_below(run_dir)
        raise FileNotFoundError(
            f"run folder {run_dir} holds no trials.parquet; expected {EXPECTED}"
            + (" (epochs.parquet alone is there)" if epochs_path.exists() else "")
            + (f". Run folders found inside it: {', '.join(hint)}" if hint else ""))
    _check_declared_schema(run_dir)
    trials = pd.read_parquet(trials_path)
    _require(trials, TRIAL_COLUMNS, trials_path)
    if trials.empty:
        raise ValueError(f"{trials_path} has no rows: run folder {run_dir} recorded no trial yet")
    # The grid keys both files; dropping repeats anyway keeps a hand-merged folder from double counting.
    trials = trials.drop_duplicates("trial", keep="last").reset_index(drop=True)
    missing = []
    epochs = pd.read_parquet(epochs_path) if epochs_path.exists() else None
    if epochs is not None and len(epochs):
        _require(epochs, EPOCH_COLUMNS, epochs_path)
        epochs = (epochs.drop_duplicates(["trial", "epoch"], keep="last")
                  .sort_values(["trial", "epoch"]).reset_index(drop=True))
    else:  # no file, or one without rows (nothing reported yet): no epoch rows
        epochs = pd.DataFrame({c: pd.Series(dtype="float64" if c != "trial" else "object") for c in EPOCH_COLUMNS})
    if not epochs_path.exists():
        missing.append(f"epochs.parquet is missing from {run_dir}: no learning curves, and the per-trial "
                       "numbers are trials.parquet's summary columns")
    per_trial = _diagnosed(_per_trial(trials, epochs, missing), trials, epochs)
    return Run(run_dir, trials, epochs, per_trial, _configs(per_trial), missing)


def _check_declared_schema(run_dir: Path) -> None:
    """Each file that declares a schema must declare the one raybench reads (SchemaError, naming both)."""
    for name in ("trials.parquet", "epochs.parquet"):
        if (run_dir / name).exists():
            check_schema(parquet_schema(run_dir / name), run_dir / name)
    record = run_dir / "experiment.json"
    try:
        declared = json.loads(record.read_text()).get("schema") if record.exists() else None
    except (OSError, ValueError, AttributeError):  # the analysis reads nothing else of it
        declared = None
    check_schema(declared, record)


def _require(df: pd.DataFrame, columns, path: Path):
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise ValueError(f"{path} lacks column(s) {lacking}; expected the schema of docs/results.md")


def _runs_below(folder: Path) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("*/trials.parquet"))


def _identity(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """trials.parquet's identity columns as the analysis reads them, and the precision each trial trained in."""
    t = trials.copy()
    t["family"] = t["family"].astype(str)
    for col in ("pretrained", "finetune"):
        t[col] = t[col].astype("boolean").fillna(False).astype(bool)
    source = t["flops_source"].fillna("").astype(str)
    t["flops_source"] = source.where(source != "", "not recorded")
    t["precision"] = _precision(t, epochs)
    return t


def _precision(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.Series:
    """The precision a trial trained in: its epoch rows' (the resolved one), else trials.parquet's (which says
    `auto` until the first epoch resolves it), else empty."""
    out = pd.Series("", index=trials.index, dtype="object")
    if "precision" in trials:
        out = trials["precision"].fillna("").astype(str)
    if "precision" in epochs and len(epochs):
        recorded = epochs[epochs["precision"].fillna("").astype(str) != ""]
        last = recorded.groupby("trial")["precision"].last().astype(str)
        out = trials["trial"].map(last).fillna(out)
    return out


def _per_trial(trials: pd.DataFrame, epochs: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    """One row per trial. Metrics come from the epoch rows where the trial has any; `source` says which."""
    g = epochs.groupby("trial")
    from_epochs = epoch_summary(epochs)
    ident = _identity(trials, epochs)
    ident = ident.drop(columns=[c for c in (*METRICS, "epochs_done") if c in ident.columns])
    ident = ident.rename(columns={"epochs": "epochs_planned"})
    df = ident.join(from_epochs, on="trial")
    has_rows = df["trial"].isin(from_epochs.index)
    df["source"] = np.where(has_rows, "epochs.parquet", "trials.parquet")
    for col in (*METRICS, "epochs_done"):  # no epoch rows: the summary trials.parquet carries, if any
        fallback = trials[col] if col in trials.columns else np.nan
        df[col] = df[col].where(has_rows, fallback)
    df["epochs_done"] = df["epochs_done"].fillna(0).astype(int)
    df["gflops"] = df["flops"] / 1e9
    df["status"] = df["status"].fillna(UNKNOWN).astype(str)
    df["error"] = df["error"].fillna("").astype(str)
    gaps = {t: sorted(set(range(1, int(n) + 1)) - set(g.get_group(t)["epoch"].astype(int)))
            for t, n in from_epochs["last_epoch"].items()}
    df["epoch_gaps"] = df["trial"].map(lambda t: gaps.get(t, []))
    df["complete"] = ((df["status"] == OK) & (df["epochs_done"] >= df["epochs_planned"])
                      & (df["epoch_gaps"].map(len) == 0))
    missing += _what_is_missing(df, trials, epochs)
    return df


def _what_is_missing(df: pd.DataFrame, trials: pd.DataFrame, epochs: pd.DataFrame) -> list[str]:
    notes = []
    for r in df.itertuples():
        done = f"{r.epochs_done} of {int(r.epochs_planned)} epochs recorded"
        if r.status == RUNNING:
            notes.append(f"{r.trial}: still running in trials.parquet, {done}")
        elif r.status == PENDING:
            notes.append(f"{r.trial}: not started yet, {done}")
        elif r.status == STOPPED_EARLY:
            pass  # the scheduler's decision, not a gap in the data: the caveats count these
        elif r.status != OK:
            notes.append(f"{r.trial}: {r.status} after {done}; error: {r.error or '(no message recorded)'}")
        elif r.epochs_done < r.epochs_planned:
            notes.append(f"{r.trial}: status ok but only {done}")
        if r.epoch_gaps:
            notes.append(f"{r.trial}: epoch rows missing from epochs.parquet for epoch(s) "
                         f"{', '.join(map(str, r.epoch_gaps))}")
        if r.source == "trials.parquet" and r.epochs_done > 0 and len(epochs):
            notes.append(f"{r.trial}: no epoch rows in epochs.parquet; its numbers are trials.parquet's summary")
    orphans = sorted(set(epochs["trial"]) - set(trials["trial"]))
    if orphans:
        notes.append(f"epoch rows for trial(s) not in trials.parquet, left out: {', '.join(orphans)}")
    if "epochs_done" in trials.columns and len(epochs):
        recorded = df.set_index("trial")["epochs_done"]
        with_rows = set(epochs["trial"])
        lag = [t for t, n in trials.set_index("trial")["epochs_done"].items()
               if t in with_rows and pd.notna(n) and int(n) != recorded[t]]
        if lag:
            notes.append(f"trials.parquet's epochs_done disagrees with the epoch rows for {', '.join(lag)} "
                         "(it lags a report behind); the tables use the epoch rows")
    return notes


def _last_per_trial(epochs: pd.DataFrame, col: str) -> pd.Series:
    if col not in epochs or not len(epochs):
        return pd.Series(dtype="float64")
    return pd.to_numeric(epochs[col], errors="coerce").groupby(epochs["trial"]).last()


def _diagnosed(df: pd.DataFrame, trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """per_trial with the diagnose step's columns: what the data was (num_classes, train/test images), the
    learning diagnosis (diagnose.py) and what the time measured (usage.py)."""
    df = df.copy()
    for col in ("num_classes", "train_images", "test_images"):
        recorded = trials[col] if col in trials else pd.Series(np.nan, index=trials.index)
        df[col] = df["trial"].map(_last_per_trial(epochs, col)).fillna(recorded.astype("float64"))
    df["num_classes"] = df["num_classes"].fillna(df["dataset"].astype(str).map(DATASET_CLASSES))
    if "data_dir" not in df:
        df["data_dir"] = ""
    df["data_dir"] = df["data_dir"].fillna("").astype(str)
    df = df.join(diagnose_trials(epochs, df), on="trial")
    df = df.join(throughput(df, epochs), on="trial")
    return df.join(shared_epochs(epochs, df.set_index("trial")["device"].fillna("").astype(str)), on="trial")


def _config_diagnosis(diagnoses) -> str:
    """The diagnoses of a configuration's seeds: a label every seed has, bare; one some have, with its count."""
    diagnoses = list(diagnoses)
    if len(diagnoses) == 1:
        return diagnoses[0]
    counts = {}
    for d in diagnoses:
        for label in (labels_of(d) or ({d} if d else set())):  # "": judged, and no label holds
            counts[label] = counts.get(label, 0) + 1
    return SEP.join(l if c == len(diagnoses) else f"{l} ({c}/{len(diagnoses)})" for l, c in counts.items())


def _configs(per_trial: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, recipe), seeds averaged. A config's complete trials are used when it has any
    (status 'ok'); else its unfinished, unfailed ones (status 'partial'), so a running grid still shows; else
    the ones a scheduler stopped early (status 'stopped-early'). Failed trials enter no average."""
    rows = []
    for (model, recipe), g in per_trial.groupby(["model", "recipe"], sort=False):
        g = g[g["epochs_done"] > 0]
        done, unfinished = g[g["complete"]], g[g["status"].isin([RUNNING, OK])]
        if (~done["excluded"]).any():  # a seed that diverged or learnt nothing is no sample of the config
            done = done[~done["excluded"]]
        use, status = next(((d, s) for d, s in ((done, OK), (unfinished, PARTIAL),
                                                 (g[g["status"] == STOPPED_EARLY], STOPPED_EARLY)) if len(d)),
                           (g.iloc[:0], None))
        if use.empty:
            continue
        first = use.iloc[0]
        row = {c: first[c] for c in CONFIG_COLUMNS}
        row.update(n=len(use), status=status, epochs_done=int(use["epochs_done"].min()),
                   seeds=", ".join(str(int(s)) for s in sorted(use["seed"])), trials=", ".join(use["trial"]),
                   precision=", ".join(sorted(set(use["precision"]) - {""})),
                   diagnosis=_config_diagnosis(use["diagnosis"]), excluded=bool(use["excluded"].all()))
        for m in (*METRICS, *DERIVED):
            row[m] = use[m].mean()
            row[m + "_std"] = use[m].std(ddof=1) if len(use) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def data_label(trials: pd.DataFrame) -> str:
    names = {"cifar100": "CIFAR-100", "imagefolder": "ImageFolder data"}
    flags = trials["synthetic"] if "synthetic" in trials else pd.Series(False, index=trials.index)
    # only a true flag or the synthetic dataset's name: a string "False" from a hand-made table is not synthetic
    flags = flags.map(lambda v: v is True or (isinstance(v, (bool, np.bool_)) and bool(v))
                      or str(v).strip().lower() == "true")
    folders = trials["data_dir"].fillna("").astype(str) if "data_dir" in trials else pd.Series("", index=trials.index)
    labels = ["synthetic data" if s or d == "synthetic" else
              f"image folder {Path(f).name}" if d == "imagefolder" and f else names.get(str(d), str(d))
              for d, s, f in zip(trials["dataset"], flags, folders)]
    return ", ".join(sorted(set(labels)))


def find_run_dir(run_dir=None, start=".") -> Path:
    """The run folder to analyse: run_dir if given, else $RAYBENCH_RUN_DIR, else the newest folder holding
    trials.parquet under the first results/ found in `start` or one of its parents."""
    chosen = run_dir or os.environ.get("RAYBENCH_RUN_DIR")
    if chosen:
        return Path(chosen)
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        results = folder / "results"
        if results.is_dir():
            runs = [p.parent for p in results.glob("*/trials.parquet")]
            if not runs:
                raise FileNotFoundError(f"{results} holds no run folder with trials.parquet; run "
                                        "`python -m raybench.grid` first or set RAYBENCH_RUN_DIR")
            return max(runs, key=lambda p: (p / "trials.parquet").stat().st_mtime)
    raise FileNotFoundError(f"no results/ folder in {start} or its parents; set RAYBENCH_RUN_DIR to a run folder "
                            f"holding {EXPECTED}")
