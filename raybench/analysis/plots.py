"""The plots of a loaded run, as PNG and SVG: accuracy against each cost, learning curves per family, the ViT
knob effects and the recipe pairs. Each is written only when the run has the data for it."""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raybench.analysis.load import Run
from raybench.analysis.tables import FLOPS_NOTE, KNOB_LABELS, num, pareto_front
from raybench.analysis.usage import TRAIN_FLOPS_FACTOR
from raybench.records import OK, RUNNING, STOPPED_EARLY

# The study's families keep the colours their plots always had; any other family takes the next free one.
FAMILY_COLORS = {"vit": "tab:blue", "resnet": "tab:red", "swin": "tab:green"}
OTHER_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
RECIPE_MARKERS = {"seed": "o", "improved": "s"}
# A curve's line says how its trial ended: solid finished, dashed still running, dash-dot stopped early by the
# scheduler (not a failure), dotted failed.
CURVE_STYLES = {OK: "-", RUNNING: "--", STOPPED_EARLY: "-."}
SCATTERS = (("acc_vs_params", "params_m", "parameters (M, log scale)", True),
            ("acc_vs_flops", "gflops", f"GFLOPs per image (log scale; {FLOPS_NOTE})", True),
            ("acc_vs_time", "mean_epoch_time_s", "training time per epoch (s)", None))
PLOT_STEMS = (*(s[0] for s in SCATTERS), "knob_effects", "recipes", "tflops_vs_flops")  # and curves_<family>
ZOOM_WHEN_SPAN = 0.25  # accuracy curves spanning under this fraction of 0-to-their-top get a zoomed axis ...
ZOOM_MIN_POINTS = 2.0  # ... unless they span under this many points: a zoom would then magnify noise
LOSS_CLIP_FACTOR = 3.0  # a loss above this x the 95th percentile of the panel's losses is clipped off the top


def family_colors(families) -> dict[str, str]:
    """A colour per family, distinct within a run."""
    others = [f for f in families if f not in FAMILY_COLORS]
    spare = [*OTHER_COLORS, *map(to_hex, matplotlib.colormaps["tab20b"].colors)]
    return {**FAMILY_COLORS, **{f: spare[i % len(spare)] for i, f in enumerate(others)}}


def curves_stem(family: str) -> str:
    """The learning-curve plot's file stem; a family name is any string, a file name is not."""
    return "curves_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", family)


def make_plots(run: Run, out_dir) -> list[Path]:
    """Writes every plot the data supports as PNG and SVG; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, colors = {}, family_colors(run.families)
    done = run.complete
    if len(done):
        done = done.assign(params_m=done["params"] / 1e6)
        for stem, col, label, log in SCATTERS:
            figures[stem] = _scatter(run, done, col, label, log, colors)
    with_rows = set(run.epochs["trial"])
    for family in run.families:
        if run.per_trial.loc[run.per_trial["family"] == family, "trial"].isin(with_rows).any():
            figures[curves_stem(family)] = _curves(run, family)
    if len(run.knob_effects):
        figures["knob_effects"] = _knobs(run, run.knob_effects)
    if len(run.recipe_pairs):
        figures["recipes"] = _recipes(run, run.recipe_pairs)
    used = run.per_trial[run.per_trial["complete"] & ~run.per_trial["excluded"]].dropna(subset=["train_tflops"])
    if used["gflops"].nunique() >= 2:
        figures["tflops_vs_flops"] = _throughput(run, used, colors)
    written = []
    # svg.fonttype none: text stays text in the SVG (searchable, editable, smaller) instead of glyph paths.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for stem, fig in figures.items():
            for ext in ("png", "svg"):
                path = out_dir / f"{stem}.{ext}"
                fig.savefig(path, dpi=150)
                written.append(path)
                # The layout is in figure fractions and points, the same for both files: solved once (it is
                # most of a figure's drawing time), kept for the second.
                fig.set_layout_engine("none")
    return written


def _figure(w: float, h: float) -> Figure:
    # A bare Figure draws on the Agg canvas without pyplot: no global backend switch, no figure registry to leak.
    return Figure(figsize=(w, h), layout="constrained")


def _scatter(run: Run, df: pd.DataFrame, col: str, xlabel: str, log, colors: dict[str, str]) -> Figure:
    more = max(0, len(df) - 20)  # the full grid has ~70 labelled points: give them room
    fig = _figure(9 + more / 10, 6 + more / 15)
    ax = fig.add_subplot()
    if log is None:  # times span orders of magnitude once Swin at 224 px sits beside ViTs at 32 px
        log = df[col].max() / max(df[col].min(), 1e-12) > 20
        xlabel += " (log scale)" if log else ""
    if log:
        ax.set_xscale("log")
    for (family, recipe), g in df.groupby(["family", "recipe"]):
        ax.scatter(g[col], 100 * g["final_test_acc"], c=colors[family],
                   marker=RECIPE_MARKERS.get(recipe, "^"), s=36, label=f"{family}, {recipe} recipe", zorder=3)
        seeded = g[g["n"] > 1]
        if len(seeded):  # several seeds: one standard deviation each way, on accuracy (and time, when plotted)
            xerr = seeded[col + "_std"] if col + "_std" in seeded else None
            ax.errorbar(seeded[col], 100 * seeded["final_test_acc"], yerr=100 * seeded["final_test_acc_std"],
                        xerr=xerr, fmt="none", ecolor=colors[family], elinewidth=1, capsize=3, zorder=3)
    front = pareto_front(df, col)
    ax.plot(front[col], 100 * front["final_test_acc"], "k--", drawstyle="steps-post", lw=1, zorder=2,
            label="Pareto front (no other point cheaper and better)")
    ax.scatter(front[col], 100 * front["final_test_acc"], s=120, facecolors="none", edgecolors="k", zorder=4)
    labels = [run.config_label(r) for _, r in df.iterrows()]
    if col == "mean_epoch_time_s" and (df["shared_epochs"] > 0).any():  # a time that includes neighbours' load
        labels = [f"{l} (shared)" if s > 0 else l for l, s in zip(labels, df["shared_epochs"])]
        xlabel += "; (shared): measured while sharing its device"
    _label_points(fig, ax, df[col], 100 * df["final_test_acc"], labels)
    what = {"params_m": "parameters", "gflops": "FLOPs", "mean_epoch_time_s": "training time per epoch"}[col]
    bars = "\nerror bars: ±1 standard deviation over seeds" if (df["n"] > 1).any() else ""
    ax.set(xlabel=xlabel, ylabel="final test accuracy (%)", title=f"Final test accuracy vs {what} ({run.label}){bars}")
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


def _trial_label(trial: str, status: str) -> str:
    if status == OK:
        return trial
    return f"{trial} ({'stopped early' if status == STOPPED_EARLY else status})"


def _lines(run: Run, trials: pd.DataFrame, ep: pd.DataFrame) -> list[tuple]:
    """What a panel draws: (label, status, mean per epoch, spread per epoch or None, excluded). A configuration's
    complete seeds make one line (their mean) with a band (their range); every other trial is a line of its own."""
    out = []
    cols = [c for c in ("train_acc", "test_acc", "train_loss", "test_loss") if c in ep]
    for (model, recipe), g in trials.groupby(["model", "recipe"], sort=False):
        seeds = g[g["complete"] & ~g["excluded"]]
        rest = g[~g["trial"].isin(seeds["trial"])] if len(seeds) > 1 else g
        if len(seeds) > 1:
            rows = ep[ep["trial"].isin(seeds["trial"])].groupby("epoch")[cols]
            out.append((f"{model} (mean of {len(seeds)} seeds; band: their range)", OK, rows.mean().reset_index(),
                        (rows.min().reset_index(), rows.max().reset_index()), False))
        for t in rest.itertuples():
            label = _trial_label(t.trial, t.status) + (f" [{t.diagnosis}]" if t.excluded else "")
            out.append((label, t.status, ep[ep["trial"] == t.trial], None, t.excluded))
    return out


def _acc_limits(values: np.ndarray) -> tuple[float, float, str]:
    """(bottom, top, note): from 0 unless the curves fill under ZOOM_WHEN_SPAN of the 0-to-top range, which
    would flatten them into a line; then zoomed, and the axis label says so."""
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 100.0, ""
    lo, hi = float(values.min()), float(values.max())
    if ZOOM_MIN_POINTS <= hi - lo < ZOOM_WHEN_SPAN * hi:
        pad = max(0.5, 0.1 * (hi - lo))
        return max(0.0, lo - pad), min(100.0, hi + pad), f" (zoomed: axis starts at {max(0.0, lo - pad):.0f}%, not 0)"
    return 0.0, min(100.0, hi * 1.05 + 1), ""


def _loss_top(values: np.ndarray, compared: np.ndarray) -> tuple[float | None, str]:
    """A diverged trial's huge loss would flatten every other curve: the axis stops a little above the largest
    loss of the trials compared (`compared`) when the others reach LOSS_CLIP_FACTOR times higher, and says so."""
    values, compared = values[np.isfinite(values)], compared[np.isfinite(compared)]
    if not len(values):
        return None, ""
    if len(compared) and values.max() > LOSS_CLIP_FACTOR * compared.max() > 0:
        top = 1.2 * float(compared.max())
        return top, f" (clipped at {top:.3g}: larger losses run off the top)"
    return float(values.max()) * 1.05, ""


def _curves(run: Run, family: str) -> Figure:
    """Per recipe a row: accuracy (left) and loss (right), test bold with dots, training faint, so the gap between
    them, the diagnosis, is what the eye sees. Legend in the order of the final test accuracy."""
    trials = run.per_trial[run.per_trial["family"] == family]
    ep = run.epochs[run.epochs["trial"].isin(trials["trial"])]
    recipes = list(dict.fromkeys(trials.loc[trials["trial"].isin(ep["trial"]), "recipe"]))
    widest = max((trials["recipe"] == r).sum() for r in recipes)
    ncol = max(1, math.ceil(widest / 30))
    has_loss = any(c in ep and ep[c].notna().any() for c in ("train_loss", "test_loss"))
    fig = _figure(12 + 3 * ncol if has_loss else 7 + 3 * ncol, 5 * len(recipes) + 0.8)
    axes = fig.subplots(len(recipes), 2 if has_loss else 1, squeeze=False)
    chance = trials["chance"].dropna().unique() if "chance" in trials else []
    for row, recipe in zip(axes, recipes):
        mine = trials[trials["recipe"] == recipe].sort_values("final_test_acc", ascending=False)
        mine = mine[mine["trial"].isin(ep["trial"])]
        lines = _lines(run, mine, ep)
        colors = matplotlib.colormaps["tab20" if len(lines) <= 20 else "turbo"](np.linspace(0, 1, max(len(lines), 2)))
        panels = (("acc", row[0]),) + ((("loss", row[1]),) if has_loss else ())
        accs, losses, compared = [], [], []
        for kind, ax in panels:
            for (label, status, mean, spread, excluded), color in zip(lines, colors):
                style = CURVE_STYLES.get(status, ":")
                for split, bold in (("test", True), ("train", False)):
                    col = f"{split}_{kind}"
                    if col not in mean or not mean[col].notna().any():
                        continue
                    scale = 100 if kind == "acc" else 1
                    y = scale * mean[col].to_numpy(dtype=float)
                    (accs if kind == "acc" else losses).append(y)
                    if kind == "loss" and not excluded:
                        compared.append(y)
                    ax.plot(mean["epoch"], y, style, color=color, lw=1.6 if bold else 0.9, alpha=1 if bold else 0.45,
                            marker="." if bold else None, label=label if bold and kind == "acc" else None)
                    if spread is not None:
                        ax.fill_between(spread[0]["epoch"], scale * spread[0][col], scale * spread[1][col],
                                        color=color, alpha=0.18 if bold else 0.08, lw=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.set_xlabel("epoch")
        ax = row[0]
        bottom, top, note = _acc_limits(np.concatenate(accs) if accs else np.array([]))
        for c in chance:
            if bottom <= 100 * c <= top:
                ax.axhline(100 * c, color="gray", ls=":", lw=1, label=f"chance ({100 * c:.3g}%)")
        ax.set_ylim(bottom, top)
        ax.set(ylabel="accuracy (%)" + note, title=f"{recipe} recipe: accuracy (bold, dots: test; faint: training)")
        handles, labels = ax.get_legend_handles_labels()
        row[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=ncol)
        if has_loss:
            top, note = _loss_top(np.concatenate(losses) if losses else np.array([]),
                                  np.concatenate(compared) if compared else np.array([]))
            row[1].set_ylim(0, top)
            row[1].set(ylabel="cross-entropy loss" + note, title=f"{recipe} recipe: loss (bold: test; faint: training)")
    stopped = ", dash-dot: stopped early" if (trials["status"] == STOPPED_EARLY).any() else ""
    fig.suptitle(f"Learning curves, {family} trials ({run.label}); solid: finished, dashed: running, dotted: "
                 f"failed{stopped}")
    return fig


def _throughput(run: Run, used: pd.DataFrame, colors: dict[str, str]) -> Figure:
    """Training throughput against forward FLOPs per image, per device kind: how much of the device each model
    size keeps busy."""
    fig = _figure(9, 6)
    ax = fig.add_subplot()
    ax.set(xscale="log", yscale="log")
    markers = dict(zip(sorted(used["device"].astype(str).unique()), "os^Dvp*"))
    for (family, device), g in used.groupby(["family", "device"]):
        ax.scatter(g["gflops"], g["train_tflops"], c=colors[family], marker=markers[str(device)], s=36,
                   label=f"{family} on {device}", zorder=3)
    per_model = used.groupby("model").agg(gflops=("gflops", "first"), tflops=("train_tflops", "mean"))
    _label_points(fig, ax, per_model["gflops"], per_model["tflops"], list(per_model.index))
    ax.set(xlabel=f"GFLOPs per image (log scale; {FLOPS_NOTE})",
           ylabel=f"train TFLOP/s (log scale; {TRAIN_FLOPS_FACTOR:g} x forward FLOPs x images/s)",
           title=f"Training throughput vs model size ({run.label})\ncompleted trials; times as measured, "
                 "sharing a device included (throughput table)")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8)
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
            ax.set_xticks(x, [num(v) for v in e["value"]])
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
