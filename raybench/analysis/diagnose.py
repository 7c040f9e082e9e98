"""Why each trial learnt as it did: labels read from its epoch rows alone.

`diagnose(rows, ...)` takes one trial's epoch rows (epoch, test_acc, and where recorded train_acc, train_loss,
test_loss) and returns its labels, joined by "," in the order of LABELS, with the epochs they rest on. Every
threshold is a named constant here, explained with the reason for its value in docs/analysis.md; a label whose
columns or epochs are not there is not given ("too few epochs to judge" when no label can be).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from raybench.records import DIVERGED as STATUS_DIVERGED

DIVERGED, NOT_LEARNING, UNDERFITTING, OVERFITTING = "diverged", "not learning", "underfitting", "overfitting"
UNSTABLE, STILL_IMPROVING, CONVERGED = "unstable", "still improving", "converged"
LABELS = (DIVERGED, NOT_LEARNING, UNDERFITTING, OVERFITTING, UNSTABLE, STILL_IMPROVING, CONVERGED)
EXCLUDED = (DIVERGED, NOT_LEARNING)  # a trial with either is no result to compare
TOO_FEW = "too few epochs to judge"
SEP = ","

# Accuracy is read as skill over guessing, (acc - chance) / (1 - chance) with chance = 1 / classes, so one
# threshold means the same on 10 classes and on 100; without a class count, skill is the accuracy itself.
MIN_EPOCHS = 3  # fewer epochs: every label but `diverged` is "too few epochs to judge"
NOT_LEARNING_SKILL = 0.02  # final test skill below this: within a margin of chance
DIVERGED_LOSS_FACTOR = 2.0  # final training loss above this x ln(classes) (a uniform guess's loss): diverged
UNDERFIT_TRAIN_SKILL = 0.5  # final training skill below this ...
UNDERFIT_GAP = 0.10  # ... and training accuracy within this of test accuracy: underfitting
OVERFIT_GAP = 0.15  # training accuracy this far above test accuracy ...
OVERFIT_LOSS_RISE = 0.05  # ... and the final test loss this fraction above its minimum, reached earlier: overfitting
UNSTABLE_ACC_DROP = 0.02  # a fall of test accuracy from one epoch to the next by more than this is a swing
UNSTABLE_LOSS_RISE = 0.05  # a rise of training loss from one epoch to the next by more than this fraction too
UNSTABLE_SWINGS = 2  # this many swings of either kind: unstable
UNSTABLE_BIG_DROP = 0.05  # one fall of test accuracy by more than this: unstable on its own
TREND_WINDOW = 3  # still improving / converged compare the mean test accuracy of the last 3 epochs with the 3 before
IMPROVING_GAIN = 0.01  # a gain of at least this between the two windows: still improving; less either way: converged
NOISE_SIGMAS = 2.0  # with the test-set size known, no accuracy step smaller than this many binomial sigmas counts


def _finite_col(rows: pd.DataFrame, col: str) -> pd.Series | None:
    """The column when the trial recorded it (some value present), else None."""
    if col not in rows:
        return None
    v = pd.to_numeric(rows[col], errors="coerce").astype(float)
    return v if v.notna().any() else None  # inf counts as recorded; NaN is a value not written


def _sigma(acc: float, test_images) -> float:
    """Binomial standard error of a test accuracy measured on `test_images` images (0 when unknown)."""
    if test_images is None or not (test_images > 0) or not math.isfinite(acc):
        return 0.0
    p = min(max(acc, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / test_images)


def diagnose(rows: pd.DataFrame, num_classes=None, status: str = "", test_images=None) -> dict:
    """One trial's diagnosis from its epoch rows. Returns diagnosis (labels joined by ","), best_epoch,
    test_loss_min_epoch, generalization_gap (final train acc - final test acc), final_train_acc, chance, and
    swings (epoch-to-epoch swings counted) and largest_drop (the largest fall of test accuracy between two
    epochs), both NaN when the trial is not judged that far."""
    rows = rows.sort_values("epoch") if len(rows) else rows
    classes = float(num_classes) if num_classes is not None and pd.notna(num_classes) and num_classes >= 2 else None
    chance = 1.0 / classes if classes else math.nan
    out = {"diagnosis": TOO_FEW, "best_epoch": math.nan, "test_loss_min_epoch": math.nan,
           "generalization_gap": math.nan, "final_train_acc": math.nan, "chance": chance, "swings": math.nan,
           "largest_drop": math.nan}

    def skill(acc: float) -> float:
        return (acc - chance) / (1 - chance) if classes else acc

    acc_rows = rows[pd.to_numeric(rows["test_acc"], errors="coerce").notna()] if len(rows) else rows
    acc = acc_rows["test_acc"].astype(float).to_numpy() if len(acc_rows) else np.array([])
    epochs = acc_rows["epoch"].to_numpy() if len(acc_rows) else np.array([])
    train_acc, train_loss, test_loss = (_finite_col(rows, c) for c in ("train_acc", "train_loss", "test_loss"))
    if len(acc):
        out["best_epoch"] = int(epochs[int(np.argmax(acc))])
    if test_loss is not None and np.isfinite(test_loss).any():
        finite = test_loss[np.isfinite(test_loss)]
        out["test_loss_min_epoch"] = int(rows.loc[finite.idxmin(), "epoch"])
    if train_acc is not None and len(acc) and pd.notna(train_acc.iloc[-1]):
        out["final_train_acc"] = float(train_acc.iloc[-1])
        out["generalization_gap"] = float(train_acc.iloc[-1]) - float(acc[-1])

    labels = []
    # An infinite loss, or a finite one far above a uniform guess's, is divergence; a NaN loss in a row says
    # nothing by itself (raybench marks a NaN training loss `diverged` in the status; a hand-written table
    # may simply lack the value).
    blew_up = any(np.isinf(c).any() for c in (train_loss, test_loss) if c is not None)
    recorded = train_loss.dropna() if train_loss is not None else pd.Series(dtype=float)
    if len(recorded) and np.isfinite(recorded.iloc[-1]):
        last = float(recorded.iloc[-1])
        if classes:
            blew_up |= last > DIVERGED_LOSS_FACTOR * math.log(classes)
        elif len(recorded) >= 2 and np.isfinite(recorded.iloc[0]):
            blew_up |= last > DIVERGED_LOSS_FACTOR * float(recorded.iloc[0])
    if status == STATUS_DIVERGED or blew_up:
        labels.append(DIVERGED)
    n = len(acc)
    if n < MIN_EPOCHS:
        out["diagnosis"] = SEP.join(labels) or TOO_FEW
        return out
    final = float(acc[-1])
    if classes and skill(final) < NOT_LEARNING_SKILL:
        labels.append(NOT_LEARNING)
    if labels:  # diverged or not learning: what the curve does after that says nothing about the model
        out["diagnosis"] = SEP.join(labels)
        return out

    gap = out["generalization_gap"]
    if math.isfinite(gap):
        if skill(out["final_train_acc"]) < UNDERFIT_TRAIN_SKILL and gap < UNDERFIT_GAP:
            labels.append(UNDERFITTING)
        tl = test_loss.dropna() if test_loss is not None else pd.Series(dtype=float)
        if gap >= OVERFIT_GAP and len(tl) >= 2:
            rose = float(tl.iloc[-1]) >= (1 + OVERFIT_LOSS_RISE) * float(tl.min())
            if out["test_loss_min_epoch"] < int(rows.loc[tl.index[-1], "epoch"]) and rose:
                labels.append(OVERFITTING)

    step = max(UNSTABLE_ACC_DROP, NOISE_SIGMAS * math.sqrt(2) * _sigma(final, test_images))
    swings = int((np.diff(acc) < -step).sum())
    out["largest_drop"] = float(max(0.0, -np.diff(acc).min()))
    if train_loss is not None:
        tl = train_loss.dropna().to_numpy(dtype=float)
        swings = max(swings, int((tl[1:] > (1 + UNSTABLE_LOSS_RISE) * tl[:-1]).sum()))
    out["swings"] = swings
    unstable = swings >= UNSTABLE_SWINGS or out["largest_drop"] > max(UNSTABLE_BIG_DROP, step)
    if unstable:
        labels.append(UNSTABLE)

    trend_judged = n >= 2 * TREND_WINDOW
    if trend_judged:
        w = TREND_WINDOW
        gain = float(acc[-w:].mean() - acc[-2 * w:-w].mean())
        floor = max(IMPROVING_GAIN, NOISE_SIGMAS * math.sqrt(2 / w) * _sigma(final, test_images))
        if gain >= floor:
            labels.append(STILL_IMPROVING)
        elif abs(gain) < floor and not unstable:
            labels.append(CONVERGED)
    out["diagnosis"] = SEP.join(labels) if labels else ("" if trend_judged else TOO_FEW)
    return out


def labels_of(diagnosis) -> set[str]:
    """The labels of a diagnosis string ("too few epochs to judge" and "" have none)."""
    if not isinstance(diagnosis, str):
        return set()
    return {l for l in diagnosis.split(SEP) if l in LABELS}


def diagnose_trials(epochs: pd.DataFrame, per_trial: pd.DataFrame) -> pd.DataFrame:
    """Every trial of per_trial (trial, status, num_classes, test_images) diagnosed from its epoch rows;
    indexed by trial. A trial without epoch rows is "too few epochs to judge" (or "diverged" by its status)."""
    groups = dict(tuple(epochs.groupby("trial"))) if len(epochs) else {}
    empty = epochs.iloc[:0]
    rows = {}
    for r in per_trial.itertuples():
        d = diagnose(groups.get(r.trial, empty), r.num_classes, r.status, r.test_images)
        rows[r.trial] = d
    cols = ["diagnosis", "best_epoch", "test_loss_min_epoch", "generalization_gap", "final_train_acc", "chance",
            "swings", "largest_drop"]
    out = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    out["excluded"] = out["diagnosis"].map(lambda d: bool(labels_of(d) & set(EXCLUDED)))
    for c in ("best_epoch", "test_loss_min_epoch", "swings"):
        out[c] = out[c].astype("Int64")
    return out
