"""Parquet in, tables, plots and a report out: the analysis of one `python -m raybench.grid` run folder.

    python -m raybench.analysis results/<run>              # writes results/<run>/analysis/
    python -m raybench.analysis results/<run> --out DIR

Input contract: docs/results.md. trials.parquet says what each trial is (model, knobs, params, FLOPs, status,
error); the per-trial metrics (final/best accuracy, accuracy after 10 epochs, mean epoch time) are recomputed
from the epoch rows, because epochs.parquet is written as results arrive while trials.parquet may lag a report
behind. A trial without epoch rows falls back to trials.parquet's own summary columns, and says so.

Every sentence of the report's discussion comes from a function below that returns nothing when the run lacks
the data for it, so a partial run gives a shorter report, never an invented one.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from raybench.records import OK, RUNNING, epoch_summary  # noqa: F401  (epoch_summary: re-exported)

FLOPS_NOTE = "FLOPs = 2 x multiply-accumulates, attention matmuls included"
KNOBS = ("patch", "dim", "depth", "heads", "mlp_ratio")
KNOB_LABELS = {"patch": "patch size (px)", "dim": "width (dim)", "depth": "depth (blocks)",
               "heads": "attention heads", "mlp_ratio": "MLP ratio"}
METRICS = ("final_test_acc", "best_test_acc", "test_acc_at_10", "mean_epoch_time_s", "total_time_s")
TRIAL_COLUMNS = ("trial", "model", "family", "recipe", "seed", *KNOBS, "params", "trainable_params", "flops",
                 "image_size", "epochs", "device", "dataset", "synthetic", "status", "error")
EPOCH_COLUMNS = ("trial", "epoch", "test_acc", "train_time_s")
EXPECTED = "epochs.parquet and trials.parquet (written by `python -m raybench.grid`, see docs/results.md)"
FAMILY_COLORS = {"vit": "tab:blue", "resnet": "tab:red", "swin": "tab:green"}
RECIPE_MARKERS = {"seed": "o", "improved": "s"}


@dataclass
class Run:
    """One run folder, loaded. `per_trial` and `configs` are what the tables, plots and report are made from."""
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


# ---------------------------------------------------------------------------------------------- loading
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
    per_trial = _per_trial(trials, epochs, missing)
    return Run(run_dir, trials, epochs, per_trial, _configs(per_trial), missing)


def _require(df: pd.DataFrame, columns, path: Path):
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise ValueError(f"{path} lacks column(s) {lacking}; expected the schema of docs/results.md")


def _runs_below(folder: Path) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("*/trials.parquet"))


def _per_trial(trials: pd.DataFrame, epochs: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    """One row per trial. Metrics come from the epoch rows where the trial has any; `source` says which."""
    g = epochs.groupby("trial")
    from_epochs = epoch_summary(epochs)
    ident = trials.drop(columns=[c for c in (*METRICS, "epochs_done") if c in trials.columns])
    ident = ident.rename(columns={"epochs": "epochs_planned"})
    df = ident.join(from_epochs, on="trial")
    has_rows = df["trial"].isin(from_epochs.index)
    df["source"] = np.where(has_rows, "epochs.parquet", "trials.parquet")
    for col in (*METRICS, "epochs_done"):  # no epoch rows: the summary trials.parquet carries, if any
        fallback = trials[col] if col in trials.columns else np.nan
        df[col] = df[col].where(has_rows, fallback)
    df["epochs_done"] = df["epochs_done"].fillna(0).astype(int)
    df["gflops"] = df["flops"] / 1e9
    df["status"] = df["status"].fillna("unknown").astype(str)
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
        elif r.status == "pending":
            notes.append(f"{r.trial}: not started yet, {done}")
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


def _configs(per_trial: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, recipe), seeds averaged. A config's complete trials are used when it has any
    (status 'ok'); else its unfinished, unfailed ones (status 'partial'), so a running grid still shows."""
    rows = []
    for (model, recipe), g in per_trial.groupby(["model", "recipe"], sort=False):
        done = g[g["complete"]]
        use = done if len(done) else g[(g["status"] == RUNNING) | (g["status"] == OK)]
        use = use[use["epochs_done"] > 0]
        if use.empty:
            continue
        first = use.iloc[0]
        row = {c: first[c] for c in ("model", "recipe", "family", *KNOBS, "params", "trainable_params", "flops",
                                     "gflops", "image_size", "epochs_planned", "dataset")}
        row.update(n=len(use), status=OK if len(done) else "partial", epochs_done=int(use["epochs_done"].min()),
                   seeds=", ".join(str(int(s)) for s in sorted(use["seed"])), trials=", ".join(use["trial"]))
        for m in METRICS:
            row[m] = use[m].mean()
            row[m + "_std"] = use[m].std(ddof=1) if len(use) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def data_label(trials: pd.DataFrame) -> str:
    names = {"cifar100": "CIFAR-100", "imagefolder": "ImageFolder data"}
    labels = ["synthetic data" if bool(s) or d == "synthetic" else names.get(str(d), str(d))
              for d, s in zip(trials["dataset"], trials["synthetic"].fillna(False))]
    return ", ".join(sorted(set(labels)))


# ---------------------------------------------------------------------------------------------- tables
def summary_tables(run: Run) -> dict[str, pd.DataFrame]:
    """Every table, keyed by file stem. Accuracies are fractions as in the Parquet input; the Markdown shows %.
    Empty tables are kept (with their columns) so code can rely on the keys."""
    c = run.configs if len(run.configs) else pd.DataFrame(columns=[
        "model", "recipe", "family", "n", "status", "epochs_done", "epochs_planned", *KNOBS, "params",
        "trainable_params", "gflops", "seeds", *METRICS, *(m + "_std" for m in METRICS)])
    order = lambda d: d.sort_values(["recipe", "final_test_acc"], ascending=[False, False]).reset_index(drop=True)
    vit_resnet = order(c[c["family"].isin(["vit", "resnet"])])[
        ["model", "recipe", "n", "status", "epochs_done", "epochs_planned", "params", "gflops",
         "mean_epoch_time_s", "test_acc_at_10", "final_test_acc", "best_test_acc"]]
    swin = order(c[c["family"] == "swin"])[
        ["model", "recipe", "n", "status", "epochs_done", "epochs_planned", "trainable_params", "params",
         "mean_epoch_time_s", "total_time_s", "final_test_acc"]]
    multi = c[c["n"] > 1]
    seeds = multi[["model", "recipe", "n", "seeds"]].copy()
    for m in METRICS:
        seeds[m + "_mean"], seeds[m + "_std"] = multi[m], multi[m + "_std"]
    trials = run.per_trial[["trial", "model", "recipe", "seed", "status", "epochs_done", "epochs_planned",
                            "final_test_acc", "best_test_acc", "mean_epoch_time_s", "source", "error"]]
    return {"vit_resnet": vit_resnet, "swin": swin, "seeds": seeds.reset_index(drop=True),
            "knob_effects": knob_effects(run), "recipes": recipe_pairs(run), "per_trial": trials}


def table_titles(run: Run) -> dict[str, str]:
    d = run.label
    return {"vit_resnet": f"ViT configurations and ResNet-18 ({d}); GFLOPs per image, {FLOPS_NOTE}",
            "swin": f"Swin runs ({d})",
            "seeds": f"Configurations run with several seeds: mean and standard deviation across seeds ({d})",
            "knob_effects": f"Effect of each ViT knob, mean over matched configurations of the other knobs ({d})",
            "recipes": f"seed vs improved recipe, paired by model ({d})",
            "per_trial": f"Every trial, its status and where its numbers come from ({d})"}


def complete_vits(run: Run) -> pd.DataFrame:
    c = run.configs
    return c[(c["family"] == "vit") & (c["status"] == OK)] if len(c) else c


def knob_effects(run: Run) -> pd.DataFrame:
    """For each knob with >= 2 values among completed ViTs: mean accuracy and cost per value, over only the
    combinations of the other knobs (and recipe) that ran with every value, so a partial grid compares like
    with like."""
    cols = ["knob", "value", "n_matched", "final_test_acc", "params", "gflops", "mean_epoch_time_s"]
    rows = []
    for knob, matched in _matched_by_knob(complete_vits(run)).items():
        means = matched.groupby(knob)[["final_test_acc", "params", "gflops", "mean_epoch_time_s"]].mean()
        n = len(matched) // matched[knob].nunique()
        rows += [{"knob": knob, "value": float(v), "n_matched": n, **r} for v, r in means.iterrows()]
    return pd.DataFrame(rows, columns=cols)


def _matched_by_knob(vit: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
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


def recipe_pairs(run: Run) -> pd.DataFrame:
    """Models that completed under both recipes, side by side."""
    cols = ["model", "family", "final_test_acc_seed", "final_test_acc_improved", "delta_points",
            "n_seed", "n_improved"]
    c = run.configs
    if c.empty:
        return pd.DataFrame(columns=cols)
    c = c[c["status"] == OK]
    s, i = (c[c["recipe"] == r].set_index("model") for r in ("seed", "improved"))
    both = s.index.intersection(i.index)
    out = pd.DataFrame({"model": both, "family": s.loc[both, "family"].values,
                        "final_test_acc_seed": s.loc[both, "final_test_acc"].values,
                        "final_test_acc_improved": i.loc[both, "final_test_acc"].values,
                        "n_seed": s.loc[both, "n"].values, "n_improved": i.loc[both, "n"].values})
    out["delta_points"] = 100 * (out["final_test_acc_improved"] - out["final_test_acc_seed"])
    return out[cols].sort_values("delta_points", ascending=False).reset_index(drop=True)


def pareto_front(df: pd.DataFrame, cost: str, value: str = "final_test_acc") -> pd.DataFrame:
    """The points no other point beats on both: nothing cheaper (or as cheap) is at least as accurate."""
    d = df.dropna(subset=[cost, value]).sort_values([cost, value], ascending=[True, False])
    return d[d[value] > d[value].cummax().shift(fill_value=-np.inf)]


# Markdown: pandas' to_markdown needs tabulate, which raybench does not depend on for one table format.
_MD_FORMAT = {
    "params": ("params (M)", lambda v: f"{v / 1e6:.2f}"),
    "trainable_params": ("trainable params (M)", lambda v: f"{v / 1e6:.2f}"),
    "gflops": (f"GFLOPs/img ({FLOPS_NOTE})", lambda v: f"{v:.3g}"),
    "mean_epoch_time_s": ("train time/epoch (s)", lambda v: f"{v:.3g}"),
    "total_time_s": ("trial time (s)", lambda v: f"{v:.3g}"),
    "delta_points": ("improved - seed (points)", lambda v: f"{v:+.1f}"),
    "n_matched": ("configs matched", str),
}


def _md_cell(col: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "n/a"
    if col in _MD_FORMAT:
        return _MD_FORMAT[col][1](v)
    if "test_acc" in col:
        return f"{100 * v:.2f}" if col.endswith("_std") else f"{100 * v:.1f}"
    if col.endswith("_std") or col.endswith("_mean"):
        return f"{v:.3g}"
    if isinstance(v, (float, np.floating)):
        return _num(v)
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


def write_tables(run: Run, out_dir, tables: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """Each non-empty table (default: summary_tables(run)) as <name>.md and <name>.parquet in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    titles, written = table_titles(run), []
    for name, df in (summary_tables(run) if tables is None else tables).items():
        if df.empty:
            continue
        (out_dir / f"{name}.md").write_text(to_markdown(df, titles[name]), encoding="utf-8")
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
        written += [out_dir / f"{name}.md", out_dir / f"{name}.parquet"]
    return written


# ---------------------------------------------------------------------------------------------- plots
SCATTERS = (("acc_vs_params", "params_m", "parameters (M, log scale)", True),
            ("acc_vs_flops", "gflops", f"GFLOPs per image (log scale; {FLOPS_NOTE})", True),
            ("acc_vs_time", "mean_epoch_time_s", "training time per epoch (s)", None))
PLOT_STEMS = (*(s[0] for s in SCATTERS), "knob_effects", "recipes")  # and curves_<family>


def make_plots(run: Run, out_dir, tables: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """Writes every plot the data supports as PNG and SVG; returns the files written. `tables` saves
    recomputing summary_tables(run)'s knob effects and recipe pairs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    done = run.configs[run.configs["status"] == OK] if len(run.configs) else run.configs
    if len(done):
        done = done.assign(params_m=done["params"] / 1e6)
        for stem, col, label, log in SCATTERS:
            figures[stem] = _scatter(run, done, col, label, log)
    for family in sorted(run.epochs.merge(run.per_trial[["trial", "family"]], on="trial")["family"].unique()):
        figures[f"curves_{family}"] = _curves(run, family)
    effects = knob_effects(run) if tables is None else tables["knob_effects"]
    if len(effects):
        figures["knob_effects"] = _knobs(run, effects)
    pairs = recipe_pairs(run) if tables is None else tables["recipes"]
    if len(pairs):
        figures["recipes"] = _recipes(run, pairs)
    written = []
    # svg.fonttype none: text stays text in the SVG (searchable, editable, smaller) instead of glyph paths.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for stem, fig in figures.items():
            for ext in ("png", "svg"):
                path = out_dir / f"{stem}.{ext}"
                fig.savefig(path, dpi=150)
                written.append(path)
    return written


def _figure(w: float, h: float) -> Figure:
    # A bare Figure draws on the Agg canvas without pyplot: no global backend switch, no figure registry to leak.
    return Figure(figsize=(w, h), layout="constrained")


def _point_label(run: Run, row) -> str:
    return row["model"] if run.configs["recipe"].nunique() == 1 else f"{row['model']} ({row['recipe']})"


def _scatter(run: Run, df: pd.DataFrame, col: str, xlabel: str, log) -> Figure:
    more = max(0, len(df) - 20)  # the full grid has ~70 labelled points: give them room
    fig = _figure(9 + more / 10, 6 + more / 15)
    ax = fig.add_subplot()
    if log is None:  # times span orders of magnitude once Swin at 224 px sits beside ViTs at 32 px
        log = df[col].max() / max(df[col].min(), 1e-12) > 20
        xlabel += " (log scale)" if log else ""
    if log:
        ax.set_xscale("log")
    for (family, recipe), g in df.groupby(["family", "recipe"]):
        ax.scatter(g[col], 100 * g["final_test_acc"], c=FAMILY_COLORS.get(family, "tab:gray"),
                   marker=RECIPE_MARKERS.get(recipe, "^"), s=36, label=f"{family}, {recipe} recipe", zorder=3)
    front = pareto_front(df, col)
    ax.plot(front[col], 100 * front["final_test_acc"], "k--", drawstyle="steps-post", lw=1, zorder=2,
            label="Pareto front (no other point cheaper and better)")
    ax.scatter(front[col], 100 * front["final_test_acc"], s=120, facecolors="none", edgecolors="k", zorder=4)
    _label_points(fig, ax, df[col], 100 * df["final_test_acc"], [_point_label(run, r) for _, r in df.iterrows()])
    what = {"params_m": "parameters", "gflops": "FLOPs", "mean_epoch_time_s": "training time per epoch"}[col]
    ax.set(xlabel=xlabel, ylabel="final test accuracy (%)", title=f"Final test accuracy vs {what} ({run.label})")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8)  # below the axes: no label hides under it
    return fig


def _label_points(fig: Figure, ax, xs, ys, labels, fontsize: float = 7):
    """Config names beside their points. A greedy pass nudges a label up or down (with a leader line) past
    the labels already placed, so clustered configs stay legible without a label-placement dependency."""
    ax.autoscale_view()
    to_axes = ax.transScale + ax.transLimits  # data -> axes fraction, for the scale and limits set so far
    pos = ax.get_position()
    char_w = 0.6 * fontsize / 72 / (pos.width * fig.get_figwidth())
    line_h = 1.3 * fontsize / 72 / (pos.height * fig.get_figheight())
    gap = 7 / 72 / (pos.width * fig.get_figwidth())  # 7 pt between a point and its label: clears the front's ring
    points = sorted(zip(to_axes.transform(np.c_[xs, ys]).tolist(), xs, ys, labels), key=lambda p: p[0])
    r = 0.5 * gap  # the markers are obstacles too
    placed = [(xa - r, ya - r, xa + r, ya + r) for (xa, ya), *_ in points]
    for (xa, ya), x, y, label in points:
        w = len(label) * char_w
        left = xa + gap + w > 1  # no room on the right: put the label left of its point
        x0 = xa - gap - w if left else xa + gap
        for shift in (0.6, 1.6, -0.6, 2.6, -1.6, 3.6, -2.6, 4.6, -3.6):  # in lines; 0.6: just above the point
            y0 = ya + (shift - 0.5) * line_h
            if not any(x0 < bx1 and bx0 < x0 + w and y0 < by1 and by0 < y0 + line_h
                       for bx0, by0, bx1, by1 in placed):
                break
        else:
            shift, y0 = 0.6, ya + 0.1 * line_h
        placed.append((x0, y0, x0 + w, y0 + line_h))
        ax.annotate(label, (x, y), xytext=(-7 if left else 7, shift * 1.3 * fontsize), textcoords="offset points",
                    fontsize=fontsize, ha="right" if left else "left", va="center",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="gray") if abs(shift) > 1 else None)


def _curves(run: Run, family: str) -> Figure:
    """One panel per recipe; legend in the order of the final accuracy, so it reads like the line ends."""
    trials = run.per_trial[run.per_trial["family"] == family]
    ep = run.epochs[run.epochs["trial"].isin(trials["trial"])]
    recipes = list(dict.fromkeys(trials.loc[trials["trial"].isin(ep["trial"]), "recipe"]))
    widest = max((trials["recipe"] == r).sum() for r in recipes)
    ncol = max(1, math.ceil(widest / 30))
    fig = _figure(7 + 3 * ncol, 5 * len(recipes) + 0.5)
    axes = fig.subplots(len(recipes), 1, sharex=True, squeeze=False)[:, 0]
    styles = {OK: "-", RUNNING: "--"}
    for ax, recipe in zip(axes, recipes):
        mine = trials[trials["recipe"] == recipe].sort_values("final_test_acc", ascending=False)
        mine = mine[mine["trial"].isin(ep["trial"])]
        colors = matplotlib.colormaps["tab20" if len(mine) <= 20 else "turbo"](np.linspace(0, 1, max(len(mine), 2)))
        for t, color in zip(mine.itertuples(), colors):
            rows = ep[ep["trial"] == t.trial]
            label = t.trial if t.status == OK else f"{t.trial} ({t.status})"
            ax.plot(rows["epoch"], 100 * rows["test_acc"], styles.get(t.status, ":"), color=color, marker=".",
                    label=label)
        ax.set(ylabel="test accuracy (%)", title=f"{recipe} recipe")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=ncol)
    axes[-1].set_xlabel("epoch")
    fig.suptitle(f"Test accuracy per epoch, {family} trials ({run.label}); dashed: running, dotted: failed")
    return fig


def _knobs(run: Run, effects: pd.DataFrame) -> Figure:
    knobs = list(dict.fromkeys(effects["knob"]))
    panels = (("final_test_acc", "final test acc (%)", 100), ("params", "params (M)", 1e-6),
              ("gflops", "GFLOPs/img", 1), ("mean_epoch_time_s", "train time/epoch (s)", 1))
    fig = _figure(13, 2.6 * len(knobs) + 0.8)
    axes = fig.subplots(len(knobs), len(panels), squeeze=False)
    for i, knob in enumerate(knobs):
        e = effects[effects["knob"] == knob]
        for j, (col, label, scale) in enumerate(panels):
            ax, x, y = axes[i, j], np.arange(len(e)), scale * e[col].to_numpy(dtype=float)
            ax.plot(x, y, "o-")
            for xi, yi in zip(x, y):
                ax.annotate(f"{yi:.3g}", (xi, yi), xytext=(0, 4), textcoords="offset points", fontsize=7,
                            ha="center")
            ax.set_xticks(x, [_num(v) for v in e["value"]])
            ax.set(xlabel=f"{KNOB_LABELS[knob]}, n={int(e['n_matched'].iloc[0])} each", ylabel=label)
            ax.margins(x=0.2, y=0.25)
            if col != "final_test_acc":  # costs from zero, so a 1% difference does not look like 2x
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Effect of each ViT knob: mean over matched configurations of the other knobs ({run.label})\n"
                 f"n = configurations per value; GFLOPs: {FLOPS_NOTE}")
    return fig


def _recipes(run: Run, pairs: pd.DataFrame) -> Figure:
    fig = _figure(8, 1.2 + 0.35 * len(pairs))
    ax = fig.add_subplot()
    y = np.arange(len(pairs))
    s, i = 100 * pairs["final_test_acc_seed"], 100 * pairs["final_test_acc_improved"]
    ax.hlines(y, np.minimum(s, i), np.maximum(s, i), color="lightgray", zorder=1)
    ax.scatter(s, y, marker="o", label="seed recipe", zorder=2)
    ax.scatter(i, y, marker="s", label="improved recipe", zorder=2)
    ax.set_yticks(y, pairs["model"])
    ax.invert_yaxis()
    ax.set(xlabel="final test accuracy (%)", title=f"seed vs improved recipe, paired by model ({run.label})")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One sentence of the discussion and the numbers it states (tests and notebooks read `values`)."""
    topic: str
    text: str
    values: dict


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _acc(row) -> str:
    """Accuracy with its spread when the config ran with several seeds (n always stated then)."""
    if row["n"] > 1:
        return f"{_pct(row['final_test_acc'])} ± {100 * row['final_test_acc_std']:.1f} (n={row['n']} seeds)"
    return _pct(row["final_test_acc"])


def _name(run: Run, row) -> str:
    return f"{row['model']} ({row['recipe']} recipe)" if run.configs["recipe"].nunique() > 1 else row["model"]


def findings(run: Run) -> list[Finding]:
    """The discussion: each finding is computed here from the data, and absent when the data is."""
    out = [*best_vit_vs_resnet(run), *resnet_findings(run), *knob_findings(run), flops_finding(run),
           efficiency_finding(run),
           *swin_findings(run), recipe_finding(run), seed_noise_finding(run)]
    return [f for f in out if f is not None]


def _done(run: Run, family: str | None = None) -> pd.DataFrame:
    c = run.configs
    if c.empty:
        return c
    c = c[(c["status"] == OK) & c["final_test_acc"].notna()]
    return c if family is None else c[c["family"] == family]


def best_vit_vs_resnet(run: Run) -> list[Finding]:
    """Per recipe: the best completed ViT, and its gap to ResNet-18 trained with the same recipe."""
    out = []
    vits, resnets = _done(run, "vit"), _scratch(_done(run, "resnet"))  # like with like: both from scratch
    for recipe, vit in (vits.groupby("recipe", sort=False) if len(vits) else []):
        best = vit.loc[vit["final_test_acc"].idxmax()]
        text = (f"Best ViT ({recipe} recipe): {best['model']} with {_acc(best)} final test accuracy after "
                f"{int(best['epochs_planned'])} epochs ({best['params'] / 1e6:.2f}M params, "
                f"{best['gflops']:.3g} GFLOPs/img).")
        values = {"best_vit": best["model"], "recipe": recipe, "best_vit_acc": best["final_test_acc"]}
        res = resnets[resnets["recipe"] == recipe] if len(resnets) else resnets
        if len(res) and (res["image_size"] == best["image_size"]).any():  # and at the ViTs' input size
            res = res[res["image_size"] == best["image_size"]]
        if len(res):
            r = res.loc[res["final_test_acc"].idxmax()]
            gap = 100 * (r["final_test_acc"] - best["final_test_acc"])
            who = f"ResNet-18 ({r['model']}, {_acc(r)})"
            if round(gap, 1) > 0:
                text += f" {who} beats it by {gap:.1f} accuracy points."
            elif round(gap, 1) < 0:
                text += f" It beats {who} by {-gap:.1f} accuracy points."
            else:
                text += f" It ties {who} to 0.1 accuracy points."
            values.update(resnet=r["model"], resnet_acc=r["final_test_acc"], gap_points=gap)
        out.append(Finding(f"best_vit_{recipe}", text, values))
    return out


def _resnet(model: str):
    from raybench.configs import parse_model_name
    return parse_model_name(model)


def _stem_size(model: str) -> tuple[str, int]:
    cfg = _resnet(model)
    return cfg.stem, cfg.image_size


def _pretrained(c: pd.DataFrame) -> pd.Series:
    return c["model"].map(lambda m: _resnet(m).pretrained)


def _scratch(c: pd.DataFrame) -> pd.DataFrame:
    return c[~_pretrained(c)] if len(c) else c


def resnet_findings(run: Run) -> list[Finding]:
    """Per recipe: ResNet-18 from ImageNet weights against from scratch, at epoch 10 and at the end."""
    out = []
    res = _done(run, "resnet")
    for recipe, g in (res.groupby("recipe", sort=False) if len(res) else []):
        pt, sc = g[_pretrained(g)], _scratch(g)
        if pt.empty or sc.empty:
            continue
        p = pt.iloc[0]
        # the scratch run with the same stem and input size, when the study has one, isolates pretraining
        same = sc[sc["model"].map(_stem_size) == _stem_size(p["model"])]
        s = (same if len(same) else sc).iloc[0]
        at10 = ""
        if pd.notna(p["test_acc_at_10"]) and pd.notna(s["test_acc_at_10"]):
            at10 = f"after 10 epochs {_pct(p['test_acc_at_10'])} vs {_pct(s['test_acc_at_10'])}, "
        d = 100 * (p["final_test_acc"] - s["final_test_acc"])
        out.append(Finding(f"resnet_pretrained_{recipe}", (
            f"ResNet-18 ({recipe} recipe) from ImageNet weights ({p['model']}, {int(p['image_size'])} px) vs from "
            f"scratch ({s['model']}, {int(s['image_size'])} px): {at10}at the end {_acc(p)} vs {_acc(s)} "
            f"({d:+.1f} points), at {p['gflops'] / s['gflops']:.2f}x the FLOPs per image and "
            f"{p['mean_epoch_time_s'] / s['mean_epoch_time_s']:.2f}x the training time per epoch"
            + ("; the stem and input size differ too, so the gap is not pretraining alone."
               if _stem_size(p["model"]) != _stem_size(s["model"]) else ".")),
            {"recipe": recipe, "delta_points": d, "pretrained_acc": p["final_test_acc"],
             "scratch_acc": s["final_test_acc"]}))
    return out


def knob_findings(run: Run) -> list[Finding]:
    out = []
    for knob, m in _matched_by_knob(complete_vits(run)).items():
        lo, hi = m[knob].min(), m[knob].max()
        per = m.pivot_table(index="_key", columns=knob,
                            values=["final_test_acc", "params", "gflops", "mean_epoch_time_s"])
        acc_lo, acc_hi = per["final_test_acc"][lo].mean(), per["final_test_acc"][hi].mean()
        ratio = {c: per[c][lo] / per[c][hi] for c in ("params", "gflops", "mean_epoch_time_s")}
        n = len(per)
        d = 100 * (acc_hi - acc_lo)
        text = (f"{KNOB_LABELS[knob].capitalize()}: {knob} {_num(lo)} vs {_num(hi)}, mean over {n} matched "
                f"configuration(s) of the other knobs: {_pct(acc_lo)} vs {_pct(acc_hi)} final test accuracy "
                f"({d:+.1f} points going to {_num(hi)}); {knob} {_num(lo)} has "
                f"{_ratio(ratio['params'])} the params, {_ratio(ratio['gflops'])} the FLOPs and "
                f"{_ratio(ratio['mean_epoch_time_s'])} the training time per epoch of {knob} {_num(hi)}.")
        if knob == "patch":
            size = int(m["image_size"].iloc[0])
            text += (f" At {size} px, patch {_num(lo)} gives {(size // int(lo)) ** 2} patches per image and patch "
                     f"{_num(hi)} {(size // int(hi)) ** 2}: attention matmuls grow with the square of that count.")
        out.append(Finding(f"knob_{knob}", text, {
            "knob": knob, "low": lo, "high": hi, "n_matched": n, "acc_low": acc_lo, "acc_high": acc_hi,
            "delta_points": d, **{f"{c}_ratio": float(r.mean()) for c, r in ratio.items()}}))
    return out


def _ratio(r: pd.Series) -> str:
    """Mean ratio over matched pairs, with the range when the pairs disagree noticeably."""
    mean = r.mean()
    if len(r) > 1 and r.max() - r.min() > 0.05 * mean:
        return f"{mean:.2f}x (range {r.min():.2f}-{r.max():.2f}x)"
    return f"{mean:.2f}x"


def flops_finding(run: Run) -> Finding | None:
    vit = _done(run, "vit")
    if len(vit) < 2:
        return None
    lo, hi = vit.loc[vit["gflops"].idxmin()], vit.loc[vit["gflops"].idxmax()]
    text = (f"FLOPs ({FLOPS_NOTE}): the completed ViTs span {lo['gflops']:.3g} ({lo['model']}) to "
            f"{hi['gflops']:.3g} GFLOPs per image ({hi['model']}), {hi['gflops'] / lo['gflops']:.1f}x.")
    values = {"gflops_min": lo["gflops"], "gflops_max": hi["gflops"]}
    res = _scratch(_done(run, "resnet"))
    if len(res):
        r = res.iloc[0]
        text += f" ResNet-18 ({r['model']}) needs {r['gflops']:.3g}."
        values["resnet_gflops"] = r["gflops"]
    if len(vit) >= 3:
        # Spearman by hand (rank, then Pearson): pandas wants scipy for method="spearman".
        rho = vit["gflops"].rank().corr(vit["mean_epoch_time_s"].rank())
        if not math.isnan(rho):
            text += (f" Across {len(vit)} completed ViTs, training time per epoch follows FLOPs with Spearman "
                     f"rank correlation {rho:.2f}.")
            values["spearman_time_flops"] = rho
    return Finding("flops", text, values)


def efficiency_finding(run: Run) -> Finding | None:
    c = _done(run)
    if len(c) < 2:
        return None
    eff = 100 * c["final_test_acc"] / (c["params"] / 1e6)
    top, low = c.loc[eff.idxmax()], c.loc[eff.idxmin()]
    text = (f"Parameter efficiency (final test accuracy points per million parameters): highest "
            f"{_name(run, top)} at {eff[top.name]:.2f} ({_pct(top['final_test_acc'])} with "
            f"{top['params'] / 1e6:.2f}M), lowest {_name(run, low)} at {eff[low.name]:.2f} "
            f"({_pct(low['final_test_acc'])} with {low['params'] / 1e6:.2f}M).")
    values = {"most_efficient": top["model"], "least_efficient": low["model"],
              "points_per_m": dict(zip(c["model"] + "/" + c["recipe"], eff))}
    vit, res = _done(run, "vit"), _done(run, "resnet")
    if len(vit) and len(res):
        b, r = vit.loc[vit["final_test_acc"].idxmax()], res.loc[res["final_test_acc"].idxmax()]
        text += (f" The best ViT, {_name(run, b)}, gets {eff[b.name]:.2f} points per M params; ResNet-18, "
                 f"{_name(run, r)}, {eff[r.name]:.2f}.")
    return Finding("efficiency", text, values)


def _swin_parts(model: str):
    m = re.match(r"^swin-(.+)-(ft|scratch)$", model)
    return (m.group(1), m.group(2)) if m else (None, None)


def swin_findings(run: Run) -> list[Finding]:
    s = _done(run, "swin")
    if s.empty:
        return []
    s = s.assign(size=[_swin_parts(m)[0] for m in s["model"]], mode=[_swin_parts(m)[1] for m in s["model"]])
    out = []
    for (size, recipe), g in s.groupby(["size", "recipe"]):
        if set(g["mode"]) >= {"ft", "scratch"}:
            ft, sc = g[g["mode"] == "ft"].iloc[0], g[g["mode"] == "scratch"].iloc[0]
            d = 100 * (ft["final_test_acc"] - sc["final_test_acc"])
            source = ("random-weight stand-in 'pretrained' weights (raybench/swin-micro-random: this contrast "
                      "tests the code path, not the value of pretraining)" if size == "micro" else "pretrained weights")
            out.append(Finding(f"swin_{size}_ft_vs_scratch", (
                f"Swin-{size.capitalize()} fine-tuned from {source} (head only, "
                f"{ft['trainable_params'] / 1e6:.2f}M of {ft['params'] / 1e6:.2f}M params trainable) reaches "
                f"{_acc(ft)} vs {_acc(sc)} from scratch after {int(ft['epochs_planned'])} epochs "
                f"({d:+.1f} points for fine-tuning), at {ft['mean_epoch_time_s'] / sc['mean_epoch_time_s']:.2f}x "
                f"the training time per epoch and {ft['total_time_s'] / sc['total_time_s']:.2f}x the whole trial's "
                f"time (evaluation and any one-off feature pass included)."),
                {"size": size, "recipe": recipe, "delta_points": d, "ft_acc": ft["final_test_acc"],
                 "scratch_acc": sc["final_test_acc"]}))
    for (mode, recipe), g in s.groupby(["mode", "recipe"]):
        if set(g["size"]) >= {"tiny", "small"}:
            t, sm = g[g["size"] == "tiny"].iloc[0], g[g["size"] == "small"].iloc[0]
            d = 100 * (sm["final_test_acc"] - t["final_test_acc"])
            out.append(Finding(f"swin_small_vs_tiny_{mode}", (
                f"Swin-Small vs Swin-Tiny ({mode}): {_acc(sm)} vs {_acc(t)} final test accuracy ({d:+.1f} points "
                f"for Small) with {sm['params'] / t['params']:.2f}x the params and "
                f"{sm['mean_epoch_time_s'] / t['mean_epoch_time_s']:.2f}x the training time per epoch."),
                {"mode": mode, "recipe": recipe, "delta_points": d, "small_acc": sm["final_test_acc"],
                 "tiny_acc": t["final_test_acc"]}))
    return out


def recipe_finding(run: Run) -> Finding | None:
    p = recipe_pairs(run)
    if p.empty:
        return None
    better = int((p["delta_points"] > 0).sum())
    text = (f"Recipe: over {len(p)} model(s) run with both, the improved recipe changes final test accuracy by "
            f"{p['delta_points'].mean():+.1f} points on average (from {p['delta_points'].min():+.1f} to "
            f"{p['delta_points'].max():+.1f}); it is better for {better} of {len(p)}.")
    if len(p) <= 6:
        text += " Per model: " + "; ".join(f"{r.model} {r.delta_points:+.1f}" for r in p.itertuples()) + "."
    return Finding("recipe", text, {"n_models": len(p), "mean_delta_points": p["delta_points"].mean(),
                                    "better": better})


def seed_noise_finding(run: Run) -> Finding | None:
    c = _done(run)
    multi = c[c["n"] > 1] if len(c) else c
    if multi.empty:
        return None
    std = 100 * multi["final_test_acc_std"]
    spread = f"{std.min():.2f}" if f"{std.min():.2f}" == f"{std.max():.2f}" else f"{std.min():.2f} to {std.max():.2f}"
    text = (f"Seed noise: {len(multi)} configuration(s) ran with several seeds; the standard deviation of final "
            f"test accuracy across seeds is {spread} points, so single-seed gaps smaller than that are within "
            f"noise.")
    return Finding("seeds", text, {"std_points_min": std.min(), "std_points_max": std.max()})


def caveats(run: Run) -> list[str]:
    pt = run.per_trial
    out = []
    if "synthetic data" in run.label:
        out.append("Data: synthetic data. The accuracies test the pipeline, not the models; only the "
                   "costs (params, FLOPs, time) carry over to real data.")
    else:
        out.append(f"Data: {run.label}.")
    plan = pt.groupby(["family", "recipe"])[["epochs_planned", "image_size"]].agg(
        lambda s: "/".join(_num(v) for v in sorted(s.dropna().unique())))
    out.append("Epochs planned and input size: " + "; ".join(
        f"{f} ({r}): {row.epochs_planned} epochs at {row.image_size} px" for (f, r), row in plan.iterrows())
        + ". Families trained for different budgets and input sizes are not a like-for-like accuracy comparison.")
    out.append(f"Device: {', '.join(run.devices) or 'not recorded'}"
               + (f" on {run.epochs['node_id'].nunique()} Ray node(s)" if "node_id" in run.epochs
                  and run.epochs["node_id"].astype(str).str.len().gt(0).any() else "")
               + ". Time per epoch is training steps only (mean over recorded epochs); trial time adds "
                 "evaluation, compilation and a frozen backbone's feature pass; trials sharing a GPU slow each "
                 "other down.")
    versions = {c: sorted(set(pt[c].dropna().astype(str)) - {""}) for c in
                ("torch_version", "ray_version", "transformers_version", "git_commit") if c in pt}
    versions = [f"{c.replace('_version', '').replace('_', ' ')} {', '.join(v)}" for c, v in versions.items() if v]
    if versions:
        out.append("Versions: " + "; ".join(versions) + ".")
    counts = pt["status"].value_counts()
    out.append("Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + (" (each failed or unfinished trial and its error: under What is missing)" if run.missing else "")
               + ". Only completed trials (status ok, every planned epoch recorded) enter the discussion, "
                 "the scatter plots and the knob effects; means are over seeds where n > 1.")
    return out


# ---------------------------------------------------------------------------------------------- report
def write_report(run: Run, out_dir, plots: list[Path] | None = None) -> Path:
    """Writes the tables, the plots (unless given) and report.md into out_dir; returns report.md's path."""
    out_dir = Path(out_dir)
    titles, tables = table_titles(run), summary_tables(run)
    written = write_tables(run, out_dir, tables)
    plots = make_plots(run, out_dir, tables) if plots is None else plots
    _remove_stale(out_dir, set(written) | set(plots), tables)
    lines = [f"# raybench analysis: {run.name} ({run.label})", "",
             f"From `{run.path}`: {len(run.per_trial)} trial(s), {len(run.epochs)} epoch row(s). Per-trial numbers "
             "come from the epoch rows (trials.parquet's summary for a trial without any); docs/analysis.md says "
             "how each figure is derived.", "",
             "## Caveats", "", *(f"- {c}" for c in caveats(run)), ""]
    if run.missing:
        lines += ["## What is missing", "", *(f"- {m}" for m in run.missing), ""]
    found = findings(run)
    lines += ["## Discussion", "", *(f"- {f.text}" for f in found)]
    if not found:
        lines.append("- No completed trial yet: nothing to discuss.")
    lines += ["", "## Tables", ""]
    for name, df in tables.items():
        if len(df):
            lines += [to_markdown(df, titles[name]), f"([{name}.parquet]({name}.parquet))", ""]
    lines += ["## Plots", ""]
    if not any(p.suffix == ".png" for p in plots):
        lines += ["(none: no epoch rows and no completed trial to plot yet)", ""]
    for p in plots:
        if p.suffix == ".png":
            lines += [f"![{p.stem}]({p.name}) ([SVG]({p.with_suffix('.svg').name}))", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _remove_stale(out_dir: Path, written: set[Path], tables: dict) -> None:
    """Drop this module's outputs that an earlier analysis of the folder wrote and this one did not (a table
    now empty, a plot the data no longer supports), so the folder and the notebook show only this report's
    files. Nothing else in the folder is touched."""
    ours = {f"{t}.{ext}" for t in tables for ext in ("md", "parquet")}
    ours |= {f"{s}.{ext}" for s in PLOT_STEMS for ext in ("png", "svg")}
    for p in out_dir.iterdir():
        if p not in written and (p.name in ours or (p.name.startswith("curves_") and p.suffix in (".png", ".svg"))):
            p.unlink()


def analyse(run_dir, out_dir=None) -> Path:
    """Loads RUN_DIR and writes tables, plots and report.md into out_dir (default RUN_DIR/analysis)."""
    run = load_run(run_dir)
    return write_report(run, Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis")


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


# ---------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raybench.analysis", description=(
        "Tables (Markdown + Parquet), plots (PNG + SVG) and report.md from a run folder's epochs.parquet and "
        "trials.parquet."))
    p.add_argument("run_dir", help="run folder written by python -m raybench.grid (results/<run>)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = analyse(args.run_dir, args.out)
    except (OSError, ValueError) as e:  # a bad folder (or --out) is the user's to fix: message, no traceback
        print(f"raybench.analysis: error: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
