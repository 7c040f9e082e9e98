"""raybench.analysis.diagnose and .usage on hand-made epoch tables: every label, and each one flipping when the
data crosses its threshold (the thresholds are read from the module, so a changed value keeps the tests true)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raybench.analysis import diagnose as dg
from raybench.analysis.diagnose import diagnose, labels_of
from raybench.analysis.usage import TRAIN_FLOPS_FACTOR, shared_epochs, throughput

EPS = 1e-3


def epochs(test_acc, train_acc=None, train_loss=None, test_loss=None) -> pd.DataFrame:
    """An epoch table: one row per value of test_acc; the other columns as given (omitted: not recorded)."""
    d = {"epoch": np.arange(1, len(test_acc) + 1), "test_acc": test_acc}
    for name, v in (("train_acc", train_acc), ("train_loss", train_loss), ("test_loss", test_loss)):
        if v is not None:
            d[name] = v
    return pd.DataFrame(d)


def rising(n, start=0.30, end=0.60):
    return list(np.linspace(start, end, n))


def labels(rows, classes=100, **kw) -> set[str]:
    return labels_of(diagnose(rows, classes, **kw)["diagnosis"])


def falling_loss(n, start=4.0, end=2.0):
    return list(np.linspace(start, end, n))


# ----------------------------------------------------------------------------------------- each label
def test_a_model_that_fits_and_keeps_gaining_is_still_improving():
    acc = rising(10)
    d = diagnose(epochs(acc, train_acc=[a + 0.05 for a in acc], train_loss=falling_loss(10),
                        test_loss=falling_loss(10, 4.1, 2.5)), 100)
    assert d["diagnosis"] == dg.STILL_IMPROVING
    assert d["best_epoch"] == 10 and d["test_loss_min_epoch"] == 10
    assert d["generalization_gap"] == pytest.approx(0.05) and d["chance"] == pytest.approx(0.01)


def test_still_improving_flips_to_converged_at_the_gain_threshold():
    w = dg.TREND_WINDOW
    for gain, label in ((dg.IMPROVING_GAIN + EPS, dg.STILL_IMPROVING), (dg.IMPROVING_GAIN - EPS, dg.CONVERGED)):
        acc = [0.2, 0.3, 0.4] + [0.5] * w + [0.5 + gain] * w  # windows differ by exactly `gain`
        rows = epochs(acc, train_acc=[a + 0.05 for a in acc], train_loss=falling_loss(len(acc)))
        assert labels(rows) == {label}, gain


def test_the_trend_needs_two_windows_of_epochs():
    n = 2 * dg.TREND_WINDOW
    acc = rising(n)
    rows = epochs(acc, train_acc=[a + 0.05 for a in acc])
    assert labels(rows) == {dg.STILL_IMPROVING}
    assert diagnose(rows.iloc[:-1], 100)["diagnosis"] == dg.TOO_FEW  # no label holds, the trend is not judged


def test_underfitting_low_training_accuracy_close_to_test():
    acc = [0.05, 0.10, 0.12, 0.12, 0.12, 0.12, 0.12]  # the seed ViTs: training accuracy as low as test
    rows = epochs(acc, train_acc=[a + 0.01 for a in acc], train_loss=falling_loss(7, 4.5, 3.9))
    assert labels(rows) == {dg.UNDERFITTING, dg.CONVERGED}


def test_underfitting_flips_on_training_skill_and_on_the_gap():
    chance = 0.01
    train_at = chance + dg.UNDERFIT_TRAIN_SKILL * (1 - chance)  # training skill exactly at the threshold
    for train, test, under in ((train_at - EPS, train_at - 0.05, True), (train_at + EPS, train_at - 0.05, False),
                               (0.30, 0.30 - dg.UNDERFIT_GAP + EPS, True), (0.30, 0.30 - dg.UNDERFIT_GAP - EPS, False)):
        acc = [test * f for f in (0.5, 0.8, 1.0)]
        rows = epochs(acc, train_acc=[train * f for f in (0.5, 0.8, 1.0)])
        assert (dg.UNDERFITTING in labels(rows)) == under, (train, test)


def test_overfitting_needs_the_gap_and_a_test_loss_past_its_minimum():
    acc = [0.30, 0.40, 0.45, 0.44, 0.43, 0.42]
    train = [0.40, 0.60, 0.80, 0.90, 0.93, 0.95]
    loss_min = 2.0
    for rise, over in ((dg.OVERFIT_LOSS_RISE + EPS, True), (dg.OVERFIT_LOSS_RISE - EPS, False)):
        test_loss = [3.0, 2.4, loss_min, 2.05, 2.08, loss_min * (1 + rise)]
        d = diagnose(epochs(acc, train_acc=train, train_loss=falling_loss(6, 3, 0.2), test_loss=test_loss), 100)
        assert (dg.OVERFITTING in labels_of(d["diagnosis"])) == over, rise
        assert d["test_loss_min_epoch"] == 3 and d["best_epoch"] == 3
    # the same curves with train accuracy just short of the gap: not overfitting
    test_loss = [3.0, 2.4, 2.0, 2.1, 2.2, 2.4]
    near = [a + dg.OVERFIT_GAP - EPS for a in acc]
    assert dg.OVERFITTING not in labels(epochs(acc, train_acc=near, test_loss=test_loss))
    assert dg.OVERFITTING in labels(epochs(acc, train_acc=[a + dg.OVERFIT_GAP + EPS for a in acc], test_loss=test_loss))
    # test loss lowest in the last epoch: not past its minimum, whatever the gap
    assert dg.OVERFITTING not in labels(epochs(acc, train_acc=train, test_loss=[3, 2.9, 2.8, 2.7, 2.6, 2.5]))


def test_unstable_counts_swings_of_test_accuracy_and_of_training_loss():
    drop = dg.UNSTABLE_ACC_DROP
    base = [0.10, 0.14, 0.18, 0.22, 0.26, 0.30]

    def swung(size, times):
        acc = list(base)
        for i in range(times):
            acc[2 + 2 * i] = acc[1 + 2 * i] - size  # falls by `size` from the epoch before
        return acc
    assert dg.UNSTABLE in labels(epochs(swung(drop + EPS, dg.UNSTABLE_SWINGS)))
    assert dg.UNSTABLE not in labels(epochs(swung(drop - EPS, dg.UNSTABLE_SWINGS)))
    assert dg.UNSTABLE not in labels(epochs(swung(drop + EPS, dg.UNSTABLE_SWINGS - 1)))
    rise = dg.UNSTABLE_LOSS_RISE
    for r, unstable in ((rise + EPS, True), (rise - EPS, False)):
        loss = [4.0, 3.0 * (1 + r) / (1 + r), 3.0, 3.0 * (1 + r), 2.5, 2.5 * (1 + r)]  # two rises of r
        assert (dg.UNSTABLE in labels(epochs(base, train_loss=loss))) == unstable, r


def test_one_fall_larger_than_the_big_drop_is_unstable_on_its_own():
    """As the p4 ViT under the seed recipe on Fashion-MNIST ended (docs/benchmarks.md): level, then 78% -> 70%."""
    for fall, unstable in ((dg.UNSTABLE_BIG_DROP + EPS, True), (dg.UNSTABLE_BIG_DROP - EPS, False)):
        acc = [0.57, 0.60, 0.67, 0.72, 0.73, 0.72, 0.73, 0.73, 0.78, 0.78 - fall]
        assert (dg.UNSTABLE in labels(epochs(acc), classes=10)) == unstable, fall
    # and it must clear the test set's sampling noise as any swing does: on 100 test images one sigma is 4.6 points
    acc = [0.57, 0.60, 0.67, 0.72, 0.73, 0.72, 0.73, 0.73, 0.78, 0.78 - 0.06]
    assert dg.UNSTABLE not in labels(epochs(acc), classes=10, test_images=100)


def test_a_swing_must_clear_the_test_sets_sampling_noise():
    drop = 0.03  # above UNSTABLE_ACC_DROP, but on 200 test images at 50% one sigma is 3.5 points
    acc = [0.40, 0.50, 0.50 - drop, 0.52, 0.52 - drop, 0.55]
    assert dg.UNSTABLE in labels(epochs(acc))
    assert dg.UNSTABLE not in labels(epochs(acc), test_images=200)
    assert dg.UNSTABLE in labels(epochs(acc), test_images=100_000)


def test_not_learning_is_test_accuracy_within_a_margin_of_chance_whatever_the_loss():
    chance = 0.1
    at = chance + dg.NOT_LEARNING_SKILL * (1 - chance)
    for final, flat in ((at - EPS, True), (at + EPS, False)):
        train = [0.5, 0.7, 0.82]  # mobilenet on Fashion-MNIST: it fits its training images, tests at chance
        rows = epochs([0.10, 0.10, final], train_acc=train, train_loss=[1.5, 0.9, 0.5], test_loss=[2.30] * 3)
        assert (labels(rows, classes=10) == {dg.NOT_LEARNING}) == flat, final
    assert dg.NOT_LEARNING not in labels(epochs([0.10, 0.10, 0.10]), classes=None)  # no chance known: not judged


def test_diverged_by_status_by_infinite_loss_or_by_a_loss_far_above_a_uniform_guess():
    acc = [0.1, 0.1, 0.1]
    ln10 = math.log(10)
    assert labels(epochs(acc), classes=10, status="diverged") == {dg.DIVERGED, dg.NOT_LEARNING}
    assert dg.DIVERGED in labels(epochs([0.3, 0.4, 0.5], train_loss=[2.0, 1.5, math.inf]), classes=10)
    for last, diverged in ((dg.DIVERGED_LOSS_FACTOR * ln10 + EPS, True), (dg.DIVERGED_LOSS_FACTOR * ln10 - EPS, False)):
        rows = epochs(acc, train_loss=[1e5, 1e4, last])  # lr 1000: finite but huge, 10% on 10 classes
        assert (dg.DIVERGED in labels(rows, classes=10)) == diverged, last
    # without a class count, against its own first epoch
    assert dg.DIVERGED in labels(epochs([0.3, 0.4, 0.5], train_loss=[2.0, 3.0, 4.0 + EPS]), classes=None)


def test_diverged_in_the_first_epoch_is_said_and_nothing_else_is():
    d = diagnose(epochs([0.01], train_loss=[math.inf]), 100)
    assert d["diagnosis"] == dg.DIVERGED


# ----------------------------------------------------------------------------------------- thin and bad input
@pytest.mark.parametrize("rows", [epochs([]), epochs([0.3]), epochs([0.3, 0.4], train_acc=[0.3, 0.4])],
                         ids=["no rows", "one epoch", "two epochs"])
def test_too_few_epochs_to_judge(rows):
    d = diagnose(rows, 100)
    assert d["diagnosis"] == dg.TOO_FEW and labels_of(d["diagnosis"]) == set()


def test_nan_losses_and_missing_columns_give_no_label_they_cannot_support():
    acc = rising(8)
    nan = [math.nan] * 8
    d = diagnose(epochs(acc, train_acc=[a + 0.3 for a in acc], train_loss=nan, test_loss=nan), 100)
    assert dg.DIVERGED not in d["diagnosis"] and dg.OVERFITTING not in d["diagnosis"]  # no loss to judge by
    assert pd.isna(d["test_loss_min_epoch"])
    only_test = diagnose(epochs(acc), 100)  # a hand-written table with test accuracy alone
    assert only_test["diagnosis"] == dg.STILL_IMPROVING and math.isnan(only_test["generalization_gap"])


# ----------------------------------------------------------------------------------------- time
def timed(trial, epoch, start, end, node="n1", gpus="0", device="H100"):
    return dict(trial=trial, epoch=epoch, started_at=start, finished_at=end, node_id=node, gpu_ids=gpus,
                device=device, test_acc=0.1, train_time_s=end - start, images_per_s=1000.0)


def test_shared_epochs_overlap_on_the_same_node_and_gpu():
    rows = pd.DataFrame([
        timed("a", 1, 0, 10), timed("a", 2, 10, 20), timed("a", 3, 20, 30),
        timed("b", 1, 15, 25),  # overlaps a's epochs 2 and 3 on node n1, GPU 0
        timed("c", 1, 0, 30, gpus="1"),  # same node, another GPU: alone
        timed("d", 1, 0, 30, node="n2"),  # another node: alone
        timed("e", 1, 30, 40),  # starts as a ends: touching is not overlapping
        timed("f", 1, 0, 5, device="cpu", gpus=""), timed("g", 1, 4, 8, device="cpu", gpus=""),  # CPU: same node
    ])
    device = rows.groupby("trial")["device"].first()
    got = shared_epochs(rows, device)
    assert got["shared_epochs"].to_dict() == {"a": 2, "b": 1, "c": 0, "d": 0, "e": 0, "f": 1, "g": 1}
    assert got.loc["a", "timed_epochs"] == 3
    without = shared_epochs(rows.drop(columns=["started_at"]), device)  # a hand-written run: not known
    assert without["shared_epochs"].isna().all()


def test_train_tflops_is_three_times_forward_flops_times_images_per_second():
    per_trial = pd.DataFrame({"trial": ["small", "big", "head"], "flops": [1e9, 4e9, 4e9],
                              "device": ["H100", "H100", "H100"], "finetune": [False, False, True]})
    rows = pd.DataFrame([dict(trial="small", images_per_s=10_000.0, feature_cache="off: not a frozen backbone"),
                         dict(trial="big", images_per_s=5_000.0, feature_cache="off: not a frozen backbone"),
                         dict(trial="head", images_per_s=90_000.0, feature_cache="on")])
    got = throughput(per_trial, rows)
    assert got.loc["small", "train_tflops"] == pytest.approx(TRAIN_FLOPS_FACTOR * 1e9 * 10_000 / 1e12)
    assert got.loc["big", "tflops_share"] == 1.0 and got.loc["small", "tflops_share"] == pytest.approx(0.5)
    assert math.isnan(got.loc["head", "train_tflops"])  # cached features: the model's FLOPs are not what ran
