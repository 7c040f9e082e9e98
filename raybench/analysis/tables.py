"""The tables of a loaded run: which columns of its frames each one shows, their titles, and their Markdown.

Accuracies stay fractions and params counts, as in the Parquet input; only the Markdown shows % and millions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from raybench.analysis.load import BUILT_IN, DERIVED, KNOBS, METRICS, Run
from raybench.analysis.usage import TRAIN_FLOPS_FACTOR
from raybench.records import OK

FLOPS_NOTE = "FLOPs = 2 x multiply-accumulates, attention matmuls included"
KNOB_LABELS = {"patch": "patch size (px)", "dim": "width (dim)", "depth": "depth (blocks)",
               "heads": "attention heads", "mlp_ratio": "MLP ratio"}
FLOPS_SOURCES = ("closed form: raybench's formulas, held to the built models by its tests; counted: "
                 "torch.utils.flop_counter on the built model")
_CONFIG_TABLE = ["model", "recipe", "n", "status", "epochs_done", "epochs_planned", "params", "gflops",
                 "mean_epoch_time_s", "test_acc_at_10", "final_test_acc", "best_test_acc", "final_train_acc",
                 "diagnosis"]
# The diagnose step's per-trial columns (docs/analysis.md): what each trial's curve says, and its time.
DIAGNOSIS_COLUMNS = ["diagnosis", "best_epoch", "test_loss_min_epoch", "final_train_acc", "generalization_gap"]
TIME_COLUMNS = ["images_per_s", "train_tflops", "tflops_share", "shared_epochs", "timed_epochs"]


def summary_tables(run: Run) -> dict[str, pd.DataFrame]:
    """Every table, keyed by file stem. Empty tables are kept (with their columns) so code can rely on the keys."""
    c = run.configs if len(run.configs) else pd.DataFrame(columns=[
        "model", "recipe", "family", "n", "status", "epochs_done", "epochs_planned", *KNOBS, "params",
        "trainable_params", "gflops", "flops_source", "pretrained", "finetune", "seeds", "diagnosis", "excluded",
        *METRICS, *(m + "_std" for m in METRICS), *DERIVED, *(m + "_std" for m in DERIVED)])
    vit_resnet = _ranked(c[c["family"].isin(["vit", "resnet"])])[_CONFIG_TABLE]
    swin = _ranked(c[c["family"] == "swin"])[
        ["model", "recipe", "n", "status", "epochs_done", "epochs_planned", "trainable_params", "params",
         "mean_epoch_time_s", "total_time_s", "final_test_acc", "final_train_acc", "diagnosis"]]
    # Families beyond the study's own (torchvision, hf, py, ...): one table, a row per configuration, each row
    # naming its family; their FLOPs may be counted rather than closed-form, so the table says which.
    others = _ranked(c[~c["family"].isin(BUILT_IN)], by=("family",))[
        ["family", "model", "recipe", "n", "status", "epochs_done", "epochs_planned", "pretrained", "finetune",
         "trainable_params", "params", "gflops", "flops_source", "mean_epoch_time_s", "total_time_s",
         "test_acc_at_10", "final_test_acc", "best_test_acc", "final_train_acc", "diagnosis"]]
    multi = c[c["n"] > 1]
    seeds = multi[["model", "recipe", "n", "seeds"]].copy()
    for m in METRICS:
        seeds[m + "_mean"], seeds[m + "_std"] = multi[m], multi[m + "_std"]
    pt = run.per_trial
    # What each model costs is known before it trains: every model of trials.parquet, failed ones included.
    complexity = (pt.drop_duplicates("model")[["model", "family", "image_size", "params", "trainable_params",
                                               "gflops", "flops_source"]]
                  .assign(_f=lambda d: d["family"].map({f: i for i, f in enumerate(run.families)}))
                  .sort_values(["_f", "params"]).drop(columns="_f").reset_index(drop=True))
    trials = pt[["trial", "model", "family", "recipe", "seed", "status", "epochs_done", "epochs_planned",
                 "final_test_acc", "best_test_acc", *DIAGNOSIS_COLUMNS, "mean_epoch_time_s", *TIME_COLUMNS,
                 "precision", "source", "error"]]
    # What each time measured: throughput per device kind, and whether the trial shared its device.
    throughput = (pt[pt["epochs_done"] > 0][["trial", "model", "device", "gflops", "mean_epoch_time_s",
                                             *TIME_COLUMNS]]
                  .sort_values(["device", "train_tflops"], ascending=[True, False]).reset_index(drop=True))
    return {"vit_resnet": vit_resnet, "swin": swin, "other_families": others, "seeds": seeds.reset_index(drop=True),
            "knob_effects": run.knob_effects, "recipes": run.recipe_pairs, "complexity": complexity,
            "per_trial": trials, "throughput": throughput}


def _ranked(configs: pd.DataFrame, by=()) -> pd.DataFrame:
    """Per recipe (seed, then improved), finished configurations first by accuracy; below them the partial and
    stopped-early ones, whose accuracy is from fewer epochs and would otherwise top a ranking it is not part of,
    and the ones diagnosed `diverged` or `not learning` (their diagnosis column says so)."""
    return (configs.assign(_done=(configs["status"] == OK) & ~configs["excluded"].astype(bool))
            .sort_values([*by, "recipe", "_done", "final_test_acc"], ascending=[*(True for _ in by), False, False, False])
            .drop(columns="_done").reset_index(drop=True))


def table_titles(run: Run) -> dict[str, str]:
    d = run.label
    others = ", ".join(f for f in run.families if f not in BUILT_IN) or "none"
    return {"vit_resnet": f"ViT configurations and ResNet-18 ({d}); GFLOPs per image, {FLOPS_NOTE}",
            "swin": f"Swin runs ({d})",
            "other_families": f"Other model families: {others} ({d}); GFLOPs per image, {FLOPS_NOTE}",
            "seeds": f"Configurations run with several seeds: mean and standard deviation across seeds ({d})",
            "knob_effects": f"Effect of each ViT knob, mean over matched configurations of the other knobs ({d})",
            "recipes": f"seed vs improved recipe, paired by model ({d})",
            "complexity": (f"Every model's size and cost per image ({d}); {FLOPS_NOTE}; FLOPs source: "
                           f"{FLOPS_SOURCES}"),
            "per_trial": (f"Every trial, its status, its diagnosis and where its numbers come from ({d}); "
                          "diagnosis vocabulary and thresholds: docs/analysis.md"),
            "throughput": (f"What each time measured ({d}): training throughput, train TFLOP/s = "
                           f"{TRAIN_FLOPS_FACTOR:g} x forward FLOPs x training images/s (the forward+backward estimate), its share of the best "
                           "on the same device kind, and the epochs that shared the device with another trial")}


def pareto_front(df: pd.DataFrame, cost: str, value: str = "final_test_acc") -> pd.DataFrame:
    """The points no other point beats on both: nothing cheaper (or as cheap) is at least as accurate."""
    d = df.dropna(subset=[cost, value]).sort_values([cost, value], ascending=[True, False])
    return d[d[value] > d[value].cummax().shift(fill_value=-np.inf)]


def num(v) -> str:
    """A knob value or size as people write it: 4, 0.5, 2.5."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# Markdown: pandas' to_markdown needs tabulate, which raybench does not depend on for one table format.
_MD_FORMAT = {
    "params": ("params (M)", lambda v: f"{v / 1e6:.2f}"),
    "trainable_params": ("trainable params (M)", lambda v: f"{v / 1e6:.2f}"),
    "gflops": (f"GFLOPs/img ({FLOPS_NOTE})", lambda v: f"{v:.3g}"),
    "mean_epoch_time_s": ("train time/epoch (s)", lambda v: f"{v:.3g}"),
    "total_time_s": ("trial time (s)", lambda v: f"{v:.3g}"),
    "delta_points": ("improved - seed (points)", lambda v: f"{v:+.1f}"),
    "n_matched": ("configs matched", str),
    "image_size": ("input (px)", lambda v: num(v)),
    "flops_source": ("FLOPs source", str),
    "final_train_acc": ("train acc (%)", lambda v: f"{100 * v:.1f}"),
    "generalization_gap": ("train - test (points)", lambda v: f"{100 * v:+.1f}"),
    "train_tflops": (f"train TFLOP/s ({TRAIN_FLOPS_FACTOR:g} x fwd)", lambda v: f"{v:.3g}"),
    "tflops_share": ("share of best on device (%)", lambda v: f"{100 * v:.0f}"),
    "images_per_s": ("train img/s", lambda v: f"{v:,.0f}"),
    "shared_epochs": ("epochs shared", lambda v: num(v)),
    "timed_epochs": ("epochs timed", lambda v: num(v)),
    "best_epoch": ("best epoch", lambda v: num(v)),
    "test_loss_min_epoch": ("min test loss epoch", lambda v: num(v)),
}


def _md_cell(col: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v == "":
        return "n/a"
    if col in _MD_FORMAT:
        return _MD_FORMAT[col][1](v)
    if "test_acc" in col:
        return f"{100 * v:.2f}" if col.endswith("_std") else f"{100 * v:.1f}"
    if col.endswith("_std") or col.endswith("_mean"):
        return f"{v:.3g}"
    if isinstance(v, (float, np.floating)):
        return num(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_header(col: str) -> str:
    if col in _MD_FORMAT:
        return _MD_FORMAT[col][0]
    base = col.replace("_mean", " mean").replace("_std", " std")
    if "test_acc" in col:
        unit = " (points)" if col.endswith("_std") else " (%)"
        base = base.replace("test_acc_at_10", "test acc @10 ep").replace("test_acc", "test acc") + unit
    return base.replace("mean_epoch_time_s", "train time/epoch (s)").replace("_", " ")


def to_markdown(df: pd.DataFrame, title: str = "") -> str:
    lines = [f"**{title}**", ""] if title else []
    if df.empty:
        return "\n".join(lines + ["(no rows)"]) + "\n"
    lines.append("| " + " | ".join(_md_header(c) for c in df.columns) + " |")
    lines.append("|" + "---|" * len(df.columns))
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(c, v) for c, v in zip(df.columns, row)) + " |")
    return "\n".join(lines) + "\n"


def write_tables(run: Run, out_dir) -> list[Path]:
    """Each non-empty table of summary_tables(run) as <name>.md and <name>.parquet in out_dir."""
    return save_tables(summary_tables(run), table_titles(run), out_dir)


def save_tables(tables: dict[str, pd.DataFrame], titles: dict[str, str], out_dir) -> list[Path]:
    """write_tables for tables already computed (the report writes the ones it also prints)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        if df.empty:
            continue
        (out_dir / f"{name}.md").write_text(to_markdown(df, titles[name]), encoding="utf-8")
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
        written += [out_dir / f"{name}.md", out_dir / f"{name}.parquet"]
    return written
