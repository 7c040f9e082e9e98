"""What a trial's time measured: the training throughput it reached, and whether it shared its device.

`train_tflops` is the usual forward+backward estimate, TRAIN_FLOPS_FACTOR x forward FLOPs per image x training
images per second; `tflops_share` is a trial's fraction of the best `train_tflops` seen on its device kind in the
run. `shared_epochs` counts a trial's epochs whose wall-clock span overlapped an epoch of another trial on the same
device (node and GPU id; on CPU, the node). Both come from documented epoch columns and are NaN where a run
lacks them (docs/analysis.md).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

TRAIN_FLOPS_FACTOR = 3.0  # backward ~ 2 x forward: the usual estimate of a training step's FLOPs
FROZEN_FLOPS_FACTOR = 1.0  # a frozen backbone runs forward only; the head's backward is a rounding error
IDLE_SHARE = 0.5  # under half the best throughput seen on the device kind: the trial leaves most of it idle
SHARING_COLUMNS = ("started_at", "finished_at", "node_id")


def throughput(per_trial: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial (indexed by trial): images_per_s (mean over its epoch rows), train_tflops, tflops_share.

    A frozen backbone's head trained on cached features (feature_cache `on`) gets no train_tflops: its steps
    never run the model whose FLOPs the trial records. A frozen backbone without that column is not estimated."""
    cols = ["images_per_s", "train_tflops", "tflops_share"]
    out = pd.DataFrame(np.nan, index=per_trial["trial"], columns=cols)
    if len(epochs) == 0:
        return out
    ep = epochs.copy()
    if "images_per_s" not in ep and "train_images" in ep:
        ep["images_per_s"] = ep["train_images"] / ep["train_time_s"]
    if "images_per_s" not in ep:
        return out
    g = ep.groupby("trial")
    ips = pd.to_numeric(ep["images_per_s"], errors="coerce").groupby(ep["trial"]).mean()
    cached = (g["feature_cache"].agg(lambda s: (s.astype(str) == "on").any()) if "feature_cache" in ep
              else pd.Series(dtype=bool))
    pt = per_trial.set_index("trial")
    frozen = pt["finetune"].astype(bool) if "finetune" in pt else pd.Series(False, index=pt.index)
    factor = pd.Series(TRAIN_FLOPS_FACTOR, index=pt.index)
    factor[frozen] = FROZEN_FLOPS_FACTOR
    known_cache = pt.index.isin(cached.index)
    factor[frozen & (~known_cache | pt.index.map(lambda t: bool(cached.get(t, False))))] = np.nan
    out["images_per_s"] = pt.index.map(ips)
    out["train_tflops"] = factor * pd.to_numeric(pt["flops"], errors="coerce") * out["images_per_s"] / 1e12
    kind = pt["device"].fillna("").astype(str)
    best = out["train_tflops"].groupby(kind).transform("max")
    out["tflops_share"] = out["train_tflops"] / best
    return out


def _gpu_keys(row) -> list[str]:
    """The devices an epoch held: its node's CPU, or each of its GPUs on that node."""
    node = str(row.node_id)
    if str(row.device) == "cpu":
        return [f"{node}/cpu"]
    ids = [i for i in str(row.gpu_ids or "").split(",") if i.strip()]
    return [f"{node}/gpu{i.strip()}" for i in ids] or [f"{node}/gpu?"]


def shared_epochs(epochs: pd.DataFrame, trial_device: pd.Series) -> pd.DataFrame:
    """Per trial (indexed by trial): timed_epochs (rows with a start, end and node) and shared_epochs (those that
    overlapped another trial's epoch on the same device). NaN for both when the run lacks the columns.

    Without gpu_ids, GPU epochs on the same node are taken to share (an upper bound)."""
    idx = trial_device.index
    out = pd.DataFrame({"timed_epochs": np.nan, "shared_epochs": np.nan}, index=idx)
    if len(epochs) == 0 or not all(c in epochs for c in SHARING_COLUMNS):
        return out
    ep = epochs.dropna(subset=list(SHARING_COLUMNS))
    ep = ep[ep["node_id"].astype(str) != ""].reset_index(drop=True)
    if ep.empty:
        return out
    from_trials = ep["trial"].map(trial_device)
    ep = ep.assign(device=ep["device"].fillna(from_trials) if "device" in ep else from_trials,
                   gpu_ids=ep["gpu_ids"].fillna("") if "gpu_ids" in ep else "")
    keyed = ep.assign(key=[_gpu_keys(r) for r in ep.itertuples()]).explode("key")
    shared = np.zeros(len(ep), dtype=bool)
    for _, g in keyed.groupby("key"):
        if g["trial"].nunique() < 2:
            continue
        s, e = g["started_at"].to_numpy(float), g["finished_at"].to_numpy(float)
        t = g["trial"].to_numpy()
        overlap = (s[:, None] < e[None, :]) & (s[None, :] < e[:, None]) & (t[:, None] != t[None, :])
        shared[g.index.to_numpy()[overlap.any(axis=1)]] = True
    ep = ep.assign(shared=shared)
    counts = ep.groupby("trial").agg(timed_epochs=("epoch", "size"), shared_epochs=("shared", "sum"))
    out.loc[out.index.intersection(counts.index)] = counts
    return out
