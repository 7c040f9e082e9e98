"""The report's sentences: the discussion (one Finding per claim) and the caveats.

Every finding comes from a function below that returns nothing when the run lacks the data for it, so a
partial run gives a shorter report, never an invented one. Claims use complete configurations only (status
ok, every planned epoch recorded, not diagnosed `diverged` or `not learning`): a trial a scheduler stopped
early, a failed, a running one or one that learnt nothing makes none (`excluded_finding` names the last).
The "why" findings read the diagnosis (diagnose.py) and what the time measured (usage.py).
A family is named by its own name; only family "vit" is called a ViT and only "resnet" ResNet-18.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from raybench.analysis.diagnose import (CONVERGED, IMPROVING_GAIN, OVERFITTING, STILL_IMPROVING, TREND_WINDOW,
                                        UNDERFITTING, UNSTABLE, UNSTABLE_ACC_DROP, UNSTABLE_LOSS_RISE, labels_of)
from raybench.analysis.load import BUILT_IN, KNOBS, Run
from raybench.analysis.tables import FLOPS_NOTE, KNOB_LABELS, num
from raybench.analysis.usage import IDLE_SHARE, TRAIN_FLOPS_FACTOR
from raybench.records import STOPPED_EARLY


@dataclass(frozen=True)
class Finding:
    """One sentence of the discussion and the numbers it states (tests and notebooks read `values`)."""
    topic: str
    text: str
    values: dict


def findings(run: Run) -> list[Finding]:
    """The discussion: each finding is computed here from the data, and absent when the data is."""
    out = [excluded_finding(run), *best_vit_vs_resnet(run), *resnet_findings(run), *underfit_findings(run),
           *overfit_findings(run), *unstable_findings(run), *size_fit_findings(run), still_improving_finding(run),
           *knob_findings(run), knob_confound_finding(run), flops_finding(run), efficiency_finding(run),
           *swin_findings(run), *family_findings(run), recipe_finding(run), recipe_diagnosis_finding(run),
           seed_noise_finding(run), *throughput_findings(run), sharing_finding(run)]
    return [f for f in out if f is not None]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _acc(row) -> str:
    """Accuracy with its spread when the config ran with several seeds (n always stated then)."""
    if row["n"] > 1:
        return f"{_pct(row['final_test_acc'])} ± {100 * row['final_test_acc_std']:.1f} (n={row['n']} seeds)"
    return _pct(row["final_test_acc"])


def _scratch(c: pd.DataFrame) -> pd.DataFrame:
    return c[~c["pretrained"]] if len(c) else c


def best_vit_vs_resnet(run: Run) -> list[Finding]:
    """Per recipe: the best completed ViT, and its gap to ResNet-18 trained with the same recipe."""
    out = []
    vits, resnets = run.done("vit"), _scratch(run.done("resnet"))  # like with like: both from scratch
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


def resnet_findings(run: Run) -> list[Finding]:
    """Per recipe: ResNet-18 from ImageNet weights against from scratch, at epoch 10 and at the end."""
    out = []
    res = run.done("resnet")
    for recipe, g in (res.groupby("recipe", sort=False) if len(res) else []):
        pt, sc = g[g["pretrained"]], _scratch(g)
        if pt.empty or sc.empty:
            continue
        p = pt.iloc[0]
        # the scratch run with the same stem and input size, when the study has one, isolates pretraining
        same = sc[(sc["stem"] == p["stem"]) & (sc["image_size"] == p["image_size"])]
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
               if (p["stem"], p["image_size"]) != (s["stem"], s["image_size"]) else ".")),
            {"recipe": recipe, "delta_points": d, "pretrained_acc": p["final_test_acc"],
             "scratch_acc": s["final_test_acc"]}))
    return out


def knob_findings(run: Run) -> list[Finding]:
    out = []
    for knob, m in run.knob_matches.items():
        lo, hi = m[knob].min(), m[knob].max()
        per = m.pivot_table(index="_key", columns=knob,
                            values=["final_test_acc", "params", "gflops", "mean_epoch_time_s"])
        acc_lo, acc_hi = per["final_test_acc"][lo].mean(), per["final_test_acc"][hi].mean()
        ratio = {c: per[c][lo] / per[c][hi] for c in ("params", "gflops", "mean_epoch_time_s")}
        n = len(per)
        d = 100 * (acc_hi - acc_lo)
        text = (f"{KNOB_LABELS[knob].capitalize()}: {knob} {num(lo)} vs {num(hi)}, mean over {n} matched "
                f"configuration(s) of the other knobs: {_pct(acc_lo)} vs {_pct(acc_hi)} final test accuracy "
                f"({d:+.1f} points going to {num(hi)}); {knob} {num(lo)} has "
                f"{_ratio(ratio['params'])} the params, {_ratio(ratio['gflops'])} the FLOPs and "
                f"{_ratio(ratio['mean_epoch_time_s'])} the training time per epoch of {knob} {num(hi)}.")
        if knob == "patch":
            size = int(m["image_size"].iloc[0])
            text += (f" At {size} px, patch {num(lo)} gives {(size // int(lo)) ** 2} patches per image and patch "
                     f"{num(hi)} {(size // int(hi)) ** 2}: attention matmuls grow with the square of that count.")
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
    vit = run.done("vit")
    if len(vit) < 2:
        return None
    lo, hi = vit.loc[vit["gflops"].idxmin()], vit.loc[vit["gflops"].idxmax()]
    text = (f"FLOPs ({FLOPS_NOTE}): the completed ViTs span {lo['gflops']:.3g} ({lo['model']}) to "
            f"{hi['gflops']:.3g} GFLOPs per image ({hi['model']}), {hi['gflops'] / lo['gflops']:.1f}x.")
    values = {"gflops_min": lo["gflops"], "gflops_max": hi["gflops"]}
    res = _scratch(run.done("resnet"))
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
    c = run.done()
    if len(c) < 2:
        return None
    eff = 100 * c["final_test_acc"] / (c["params"] / 1e6)
    top, low = c.loc[eff.idxmax()], c.loc[eff.idxmin()]
    text = (f"Parameter efficiency (final test accuracy points per million parameters): highest "
            f"{run.config_label(top)} at {eff[top.name]:.2f} ({_pct(top['final_test_acc'])} with "
            f"{top['params'] / 1e6:.2f}M), lowest {run.config_label(low)} at {eff[low.name]:.2f} "
            f"({_pct(low['final_test_acc'])} with {low['params'] / 1e6:.2f}M).")
    values = {"most_efficient": top["model"], "least_efficient": low["model"],
              "points_per_m": dict(zip(c["model"] + "/" + c["recipe"], eff))}
    vit, res = run.done("vit"), run.done("resnet")
    if len(vit) and len(res):
        b, r = vit.loc[vit["final_test_acc"].idxmax()], res.loc[res["final_test_acc"].idxmax()]
        text += (f" The best ViT, {run.config_label(b)}, gets {eff[b.name]:.2f} points per M params; ResNet-18, "
                 f"{run.config_label(r)}, {eff[r.name]:.2f}.")
    return Finding("efficiency", text, values)


def swin_findings(run: Run) -> list[Finding]:
    s = run.done("swin")
    if s.empty:
        return []
    s = s.assign(mode=s["finetune"].map({True: "ft", False: "scratch"}))
    out = []
    for (size, recipe), g in s.groupby(["swin_size", "recipe"]):
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
        if set(g["swin_size"]) >= {"tiny", "small"}:
            t, sm = g[g["swin_size"] == "tiny"].iloc[0], g[g["swin_size"] == "small"].iloc[0]
            d = 100 * (sm["final_test_acc"] - t["final_test_acc"])
            out.append(Finding(f"swin_small_vs_tiny_{mode}", (
                f"Swin-Small vs Swin-Tiny ({mode}): {_acc(sm)} vs {_acc(t)} final test accuracy ({d:+.1f} points "
                f"for Small) with {sm['params'] / t['params']:.2f}x the params and "
                f"{sm['mean_epoch_time_s'] / t['mean_epoch_time_s']:.2f}x the training time per epoch."),
                {"mode": mode, "recipe": recipe, "delta_points": d, "small_acc": sm["final_test_acc"],
                 "tiny_acc": t["final_test_acc"]}))
    return out


def family_findings(run: Run) -> list[Finding]:
    """Per family beyond the study's own (torchvision, hf, py, ...) and recipe: its best complete model, named
    by its family, beside the best ViT of the same recipe."""
    out = []
    vits = run.done("vit")
    for family in (f for f in run.families if f not in BUILT_IN):
        done = run.done(family)
        for recipe, g in (done.groupby("recipe", sort=False) if len(done) else []):
            best = g.loc[g["final_test_acc"].idxmax()]
            how = ("fine-tuned, frozen backbone" if best["finetune"] else
                   "from pretrained weights" if best["pretrained"] else "from scratch")
            text = (f"Best {family} model ({recipe} recipe): {best['model']} ({how}, {int(best['image_size'])} px) "
                    f"with {_acc(best)} final test accuracy after {int(best['epochs_planned'])} epochs "
                    f"({best['params'] / 1e6:.2f}M params, {best['trainable_params'] / 1e6:.2f}M trainable, "
                    f"{best['gflops']:.3g} GFLOPs/img, FLOPs {best['flops_source']}).")
            values = {"family": family, "recipe": recipe, "best": best["model"], "acc": best["final_test_acc"]}
            vit = vits[vits["recipe"] == recipe] if len(vits) else vits
            if len(vit):
                v = vit.loc[vit["final_test_acc"].idxmax()]
                gap = 100 * (best["final_test_acc"] - v["final_test_acc"])
                text += (f" The best ViT of that recipe, {v['model']}, reaches {_acc(v)}: {gap:+.1f} points for "
                         f"{best['model']}, at {best['gflops'] / v['gflops']:.2f}x its FLOPs per image and "
                         f"{best['mean_epoch_time_s'] / v['mean_epoch_time_s']:.2f}x its training time per epoch"
                         + (f" (input {int(best['image_size'])} px vs {int(v['image_size'])} px: not like for like)."
                            if best["image_size"] != v["image_size"] else "."))
                values.update(best_vit=v["model"], gap_points=gap)
            out.append(Finding(f"best_{family}_{recipe}", text, values))
    return out


def recipe_finding(run: Run) -> Finding | None:
    p = run.recipe_pairs
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
    c = run.done()
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
    out = [data_caveat(run)]
    plan = pt.groupby(["family", "recipe"], sort=False)[["epochs_planned", "image_size"]].agg(
        lambda s: "/".join(num(v) for v in sorted(s.dropna().unique())))
    plan = plan.reindex(sorted(plan.index, key=lambda k: (run.families.index(k[0]), k[1])))
    budgets = pt[["epochs_planned", "image_size"]].drop_duplicates().dropna()
    out.append("Epochs planned and input size: " + "; ".join(
        f"{f} ({r}): {row.epochs_planned} epochs at {row.image_size} px" for (f, r), row in plan.iterrows())
        + (". Families trained for different budgets and input sizes are not a like-for-like accuracy comparison."
           if len(budgets) > 1 else ". Every trial had the same budget and input size."))
    out.append(f"Device: {', '.join(run.devices) or 'not recorded'}"
               + (f" on {run.epochs['node_id'].nunique()} Ray node(s)" if "node_id" in run.epochs
                  and run.epochs["node_id"].astype(str).str.len().gt(0).any() else "")
               + ". Time per epoch is training steps only (mean over recorded epochs); trial time adds "
                 "evaluation, compilation and a frozen backbone's feature pass. " + _sharing_caveat(pt))
    out.append(_precision_caveat(pt))
    versions = _versions(pt)
    if versions:
        out.append("Versions: " + "; ".join(versions) + ".")
    counts = pt["status"].value_counts()
    out.append("Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + (" (each failed or unfinished trial and its error: under What is missing)" if run.missing else "")
               + ". Only completed trials (status ok, every planned epoch recorded) that neither diverged nor "
                 "failed to learn enter the comparisons, the scatter plots and the knob effects; means are over "
                 "seeds where n > 1."
               + (f" {len(run.excluded)} trial(s) diagnosed `diverged` or `not learning` are left out (named in the "
                  "discussion)." if len(run.excluded) else "")
               + (f" The {counts[STOPPED_EARLY]} stopped-early trial(s) were ended by the scheduler (ASHA) for "
                  "falling behind, not by a failure: they are in the per-trial table and the learning curves "
                  "(dash-dot), with the accuracy they had when stopped." if STOPPED_EARLY in counts else ""))
    return out


def _sharing_caveat(pt: pd.DataFrame) -> str:
    timed = pt.dropna(subset=["timed_epochs"])
    if timed.empty:
        return ("Whether trials shared a device is not known: the epoch rows lack started_at, finished_at and "
                "node_id, so times may include other trials' load.")
    n = int((timed["shared_epochs"] > 0).sum())
    if n == 0:
        return "No timed epoch overlapped another trial's on the same device: every time was measured alone."
    return (f"{n} of {len(timed)} trials shared their device for some epochs (the `shared_epochs` column; the "
            "discussion names them): their times include their neighbours' load.")


def _values(pt: pd.DataFrame, col: str, fmt=lambda v: f"{int(v):,}") -> str:
    if col not in pt:
        return ""
    values = sorted(set(pt[col].dropna()))
    return " / ".join(fmt(v) for v in values)


def data_caveat(run: Run) -> str:
    """What the run trained on, as the columns record it: dataset, folder, classes, training and test images,
    input size; "not recorded" where a column is absent."""
    pt = run.per_trial
    facts = []
    folders = sorted(set(pt["data_dir"]) - {""}) if "data_dir" in pt else []
    if folders:
        facts.append(f"folder {', '.join(folders)}")
    for col, what in (("num_classes", "classes"), ("train_images", "training images"),
                      ("test_images", "test images")):
        v = _values(pt, col)
        facts.append(f"{v} {what}" if v else f"{what} not recorded")
    facts.append(f"input {_values(pt, 'image_size', lambda v: num(v))} px")
    text = f"Data: {run.label}, " + ", ".join(facts) + "."
    if "synthetic data" in run.label:
        text += (" The accuracies test the pipeline, not the models; only the costs (params, FLOPs, time) carry "
                 "over to real data.")
    return text


def _precision_caveat(pt: pd.DataFrame) -> str:
    names = {"bf16": "bf16 autocast", "fp32": "fp32", "auto": "auto (no epoch yet to resolve it)"}
    counts = pt["precision"].replace("", "not recorded").value_counts()
    if list(counts.index) == ["not recorded"]:
        return "Precision: not recorded in this run."
    if len(counts) == 1:
        return f"Precision: {names.get(counts.index[0], counts.index[0])} for every trial."
    return ("Precision: " + ", ".join(f"{names.get(p, p)} for {n} trial(s)" for p, n in counts.items())
            + "; times of trials at different precisions are not like for like.")


def _versions(pt: pd.DataFrame) -> list[str]:
    """Provenance as trials.parquet records it (raybench.records.versions and the commit): every *_version
    column, so one added there shows here without a change."""
    out = []
    for c in [c for c in pt.columns if c.endswith("_version")] + ["git_commit"]:
        if c not in pt:
            continue
        values = sorted(set(pt[c].dropna().astype(str)) - {""})
        name = c.removesuffix("_version").replace("_", " ")
        if c == "cuda_version":  # torch's CPU builds have none: say so rather than leave it out
            out.append(f"CUDA {', '.join(values) or 'none (CPU build of torch)'}")
        elif values:
            out.append(f"{name} {', '.join(values)}")
    return out


# --- why: sentences computed from the diagnoses (diagnose.py) and from what the time measured (usage.py) -----
FAMILY_NAMES = {"vit": "ViT", "resnet": "ResNet-18", "swin": "Swin"}
SIZE_FIT_POINTS = 1.0  # the larger and smaller halves of a family must differ by this much to explain a gap
KNOB_WORDS = {"patch": "patch size", "dim": "width", "depth": "depth", "heads": "heads", "mlp_ratio": "MLP ratio"}
DETAIL_AT_MOST = 3  # trials named one by one in a sentence; beyond that, counted
LISTED_AT_MOST = 8  # names listed before "and N more"


def _fam(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def _names(names, most: int = LISTED_AT_MOST) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _and(words, conj: str = "and") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conj} {words[-1]}"


def _span(values, scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    lo, hi = scale * min(values), scale * max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def judged(run: Run) -> pd.DataFrame:
    """The trials whose numbers enter comparisons: complete, and not diagnosed diverged or not learning."""
    pt = run.per_trial
    return pt[pt["complete"] & ~pt["excluded"]]


def excluded_finding(run: Run) -> Finding | None:
    """Names the trials left out of every comparison, with the numbers that put them there."""
    ex = run.excluded
    if ex.empty:
        return None
    parts = []
    for r in ex.itertuples():
        why = [l for l in r.diagnosis.split(",")]
        facts = []
        if pd.notna(r.final_test_acc):
            chance = f", chance {_pct(r.chance)} with {int(r.num_classes)} classes" if pd.notna(r.chance) else ""
            facts.append(f"final test accuracy {_pct(r.final_test_acc)}{chance}")
        if r.status != "ok":
            facts.append(f"status {r.status}")
        parts.append(f"{r.trial} ({' and '.join(why)}: {'; '.join(facts) or 'no epoch rows'})")
    text = ("Left out of every comparison, ranking and plot of results (a trial that diverged or does not learn is "
            f"not a result to compare): {'; '.join(parts)}.")
    return Finding("excluded", text, {"trials": list(ex["trial"]),
                                      "diagnoses": dict(zip(ex["trial"], ex["diagnosis"]))})


def _with(df: pd.DataFrame, label: str) -> pd.DataFrame:
    return df[df["diagnosis"].map(lambda d: label in labels_of(d))] if len(df) else df


def _labelled_groups(run: Run, label: str):
    """(family, recipe, the judged trials of that pair, those of them labelled `label`), for each pair with one."""
    j = judged(run)
    for (family, recipe), g in (j.groupby(["family", "recipe"], sort=False) if len(j) else []):
        labelled = _with(g, label)
        if not labelled.empty:
            yield family, recipe, g, labelled


def underfit_findings(run: Run) -> list[Finding]:
    out = []
    for family, recipe, g, u in _labelled_groups(run, UNDERFITTING):
        trials = run.trials.set_index("trial")
        how = ""
        if {"optimizer", "lr"} <= set(trials.columns):
            opt = trials.loc[u["trial"], ["optimizer", "lr"]].astype(str).agg(" lr ".join, axis=1).unique()
            how = f" (this recipe: {', '.join(opt)})"
        text = (f"{len(u)} of {len(g)} {_fam(family)} trial(s) ({recipe} recipe) underfit: their final training "
                f"accuracy is {_span(u['final_train_acc'])}%, within {100 * u['generalization_gap'].max():.1f} "
                f"points of their test accuracy ({_span(u['final_test_acc'])}%). They do not fit the images they "
                f"train on, so more data would not lift them; their optimisation{how} is what limits them, not "
                "over-fitting.")
        conv, imp = _with(u, CONVERGED), _with(u, STILL_IMPROVING)
        if len(conv) == len(u):
            text += " Their test accuracy has levelled off (converged): more epochs of this recipe would not help."
        elif len(imp):
            text += (f" {len(imp)} of them were still improving at the last epoch ({_names(imp['trial'], 4)}): "
                     "more epochs would pay there.")
        out.append(Finding(f"underfit_{family}_{recipe}", text, {
            "family": family, "recipe": recipe, "trials": list(u["trial"]), "n": len(g),
            "train_acc_max": float(u["final_train_acc"].max())}))
    return out


def overfit_findings(run: Run) -> list[Finding]:
    out = []
    for family, recipe, g, o in _labelled_groups(run, OVERFITTING):
        o = o.assign(drop=o["best_test_acc"] - o["final_test_acc"]).sort_values("drop", ascending=False)
        sentences = []
        for r in o.head(DETAIL_AT_MOST).itertuples():
            s = (f"{r.trial} overfits from epoch {int(r.test_loss_min_epoch)}: its test loss is lowest there and "
                 f"rises after, while training accuracy reaches {_pct(r.final_train_acc)} against "
                 f"{_pct(r.final_test_acc)} on the test set")
            if round(100 * r.drop, 1) > 0:
                s += (f"; its best test accuracy ({_pct(r.best_test_acc)}, epoch {int(r.best_epoch)}) is "
                      f"{100 * r.drop:.1f} points above its final one")
            sentences.append(s)
        text = f"{_fam(family)} ({recipe} recipe): " + "; ".join(sentences) + "."
        if len(o) > DETAIL_AT_MOST:
            text += f" {len(o)} of {len(g)} {_fam(family)} trials of this recipe overfit."
        text += " Stopping at the test-loss minimum, or more regularisation, would keep the better accuracy."
        top = o.iloc[0]
        out.append(Finding(f"overfit_{family}_{recipe}", text, {
            "family": family, "recipe": recipe, "trials": list(o["trial"]),
            "from_epoch": int(top["test_loss_min_epoch"]), "best_epoch": int(top["best_epoch"]),
            "drop_points": 100 * float(top["drop"])}))
    return out


def unstable_findings(run: Run) -> list[Finding]:
    out = []
    for family, recipe, g, u in _labelled_groups(run, UNSTABLE):
        worst = u.loc[u["largest_drop"].idxmax()]
        text = (f"{_fam(family)} trials under the {recipe} recipe are unstable ({len(u)} of {len(g)}): their test "
                f"accuracy falls by more than {100 * UNSTABLE_ACC_DROP:.0f} points from one epoch to the next, or "
                f"their training loss rises by more than {100 * UNSTABLE_LOSS_RISE:.0f}%, {int(u['swings'].min())}"
                + (f" to {int(u['swings'].max())}" if u["swings"].max() != u["swings"].min() else "")
                + f" times over their {int(u['epochs_done'].max())} epochs, rather than trending; the largest fall "
                f"is {100 * worst['largest_drop']:.1f} points ({worst['trial']}). A final accuracy of an unstable "
                "curve depends on the epoch it stops at: compare best accuracies, or steady the optimisation "
                "(lower learning rate, warmup, decay) first.")
        out.append(Finding(f"unstable_{family}_{recipe}", text, {
            "family": family, "recipe": recipe, "trials": list(u["trial"]), "n": len(g),
            "largest_drop_points": 100 * float(worst["largest_drop"])}))
    return out


def still_improving_finding(run: Run) -> Finding | None:
    j = judged(run)
    s = _with(j, STILL_IMPROVING)
    if s.empty:
        return None
    text = (f"Still improving at their last epoch ({len(s)} of {len(j)} compared trials): {_names(s['trial'])}. "
            f"Their mean test accuracy over the last {TREND_WINDOW} epochs is at least {100 * IMPROVING_GAIN:.0f} "
            f"point above the {TREND_WINDOW} before: more epochs would pay, and their final accuracy understates "
            "them in any ranking against converged trials.")
    return Finding("still_improving", text, {"trials": list(s["trial"])})


def size_fit_findings(run: Run) -> list[Finding]:
    """Per family and recipe: do its larger models test worse because they fit worse (optimisation) or
    because they fit better and generalise worse (over-fitting)? The larger and smaller halves by params."""
    out = []
    c = run.complete
    for (family, recipe), g in (c.groupby(["family", "recipe"], sort=False) if len(c) else []):
        g = g.dropna(subset=["final_train_acc"]).sort_values("params")
        if len(g) < 2 or g["params"].nunique() < 2:
            continue
        half = len(g) // 2
        small, big = g.iloc[:half], g.iloc[len(g) - half:]
        te = 100 * (big["final_test_acc"].mean() - small["final_test_acc"].mean())
        tr = 100 * (big["final_train_acc"].mean() - small["final_train_acc"].mean())
        if abs(te) < SIZE_FIT_POINTS:
            continue
        fam = _fam(family)
        both = (f"training accuracy {_pct(big['final_train_acc'].mean())} vs {_pct(small['final_train_acc'].mean())}, "
                f"test {_pct(big['final_test_acc'].mean())} vs {_pct(small['final_test_acc'].mean())}")
        who = f"larger {fam}s ({_names(big['model'], 4)}) than the smaller ones ({_names(small['model'], 4)})"
        if te < 0 and tr <= -SIZE_FIT_POINTS:
            text = (f"The larger {fam}s ({recipe} recipe) also fit their training data worse: {both} for the {who}. "
                    "The gap is optimisation, not over-fitting.")
            kind = "optimisation"
        elif te < 0 and tr >= SIZE_FIT_POINTS:
            text = (f"The larger {fam}s ({recipe} recipe) fit their training data better but test worse: {both} for "
                    f"the {who}. They over-fit: capacity the data does not support.")
            kind = "overfitting"
        elif te > 0 and tr >= SIZE_FIT_POINTS:
            text = (f"The larger {fam}s ({recipe} recipe) fit their training data better and test better: {both} for "
                    f"the {who}. At this budget, capacity pays.")
            kind = "capacity"
        else:
            continue
        out.append(Finding(f"size_fit_{family}_{recipe}", text, {
            "family": family, "recipe": recipe, "kind": kind, "test_points": te, "train_points": tr}))
    return out


def recipe_diagnosis_finding(run: Run) -> Finding | None:
    """The matched seed/improved pairs in the terms of the diagnosis: labels and training accuracy under each."""
    p = run.recipe_pairs
    if p.empty:
        return None
    c = run.complete.set_index(["model", "recipe"])
    parts = []
    for r in p.itertuples():
        s, i = c.loc[(r.model, "seed")], c.loc[(r.model, "improved")]
        parts.append(f"{r.model}: seed {s['diagnosis'] or 'no label'} (training {_pct(s['final_train_acc'])}, test "
                     f"{_pct(s['final_test_acc'])}) -> improved {i['diagnosis'] or 'no label'} (training "
                     f"{_pct(i['final_train_acc'])}, test {_pct(i['final_test_acc'])})")
    text = "Recipe, in the terms of the diagnosis: " + "; ".join(parts[:6]) + (
        f"; and {len(parts) - 6} more pairs (recipes table)." if len(parts) > 6 else ".")
    return Finding("recipe_diagnosis", text, {"pairs": len(p)})


def throughput_findings(run: Run) -> list[Finding]:
    """Per device kind: training throughput against model size, and the models that leave the device idle."""
    out = []
    pt = judged(run).dropna(subset=["train_tflops"])
    for device, g in (pt.groupby("device") if len(pt) else []):
        m = g.groupby("model").agg(gflops=("gflops", "first"), tflops=("train_tflops", "mean"),
                                   share=("tflops_share", "mean")).sort_values("gflops")
        if len(m) < 2 or m["gflops"].nunique() < 2:
            continue
        lo, hi, best = m.iloc[0], m.iloc[-1], m.loc[m["tflops"].idxmax()]
        rho = m["gflops"].rank().corr(m["tflops"].rank()) if len(m) >= 3 else float("nan")
        text = (f"Training throughput on {device} (train_tflops: {TRAIN_FLOPS_FACTOR:g} x forward FLOPs x training "
                f"images per second, the usual forward+backward estimate): the smallest model, {lo.name} "
                f"({lo['gflops']:.3g} GFLOPs/img), reaches {lo['tflops']:.3g} TFLOP/s, "
                f"{lo['tflops'] / hi['tflops']:.0%} of the {hi['tflops']:.3g} of the largest, {hi.name} "
                f"({hi['gflops']:.3g} GFLOPs/img)"
                + (f"; across {len(m)} models, Spearman rank correlation of throughput with FLOPs {rho:.2f}"
                   if rho == rho else "")
                + (". The small models' steps are too small to keep the device busy." if
                   lo["tflops"] < IDLE_SHARE * hi["tflops"] else "."))
        out.append(Finding(f"throughput_size_{device}", text, {
            "device": device, "smallest": lo.name, "largest": hi.name, "fraction": lo["tflops"] / hi["tflops"],
            "spearman": rho}))
        idle = m[m["share"] < IDLE_SHARE]
        if len(idle):
            out.append(Finding(f"idle_{device}", (
                f"On {device}, {len(idle)} of {len(m)} models reach under {IDLE_SHARE:.0%} of the best training "
                f"throughput seen on it ({best.name}, {best['tflops']:.3g} TFLOP/s): {_names(idle.index)}. They leave "
                "most of what the device gave the best model idle, so they are the ones that pack well, several "
                f"to a {'node' if device == 'cpu' else 'GPU'}."), {"device": device, "models": list(idle.index),
                                                                 "best": best.name}))
    return out


def sharing_finding(run: Run) -> Finding | None:
    pt = run.per_trial.dropna(subset=["timed_epochs"])
    if pt.empty:
        return None
    sh = pt[pt["shared_epochs"] > 0]
    if sh.empty:
        return Finding("sharing", (f"Every timed epoch of the {len(pt)} trial(s) ran alone on its device (no "
                                   "other trial's epoch overlapped it on the same node and GPU): the times per "
                                   "epoch are each model's own."), {"shared_trials": [], "alone": list(pt["trial"])})
    alone = pt[pt["shared_epochs"] == 0]
    listed = [f"{r.trial} ({int(r.shared_epochs)} of {int(r.timed_epochs)} epochs)" for r in sh.itertuples()]
    text = (f"Times measured while sharing a device: {len(sh)} of {len(pt)} trials had epochs that overlapped another "
            f"trial's on the same device (node and GPU; on CPU, the node): {_names(listed)}. Their time per epoch "
            "includes their neighbours' load, so it overstates what the model costs alone, by more beside heavier "
            "neighbours: time comparisons (ratios, the time scatter plot, the FLOPs-time correlation) favour trials "
            "that ran alone" + (f" ({_names(alone['trial'], 4)})" if len(alone) else "") + ".")
    return Finding("sharing", text, {"shared_trials": list(sh["trial"]), "alone": list(alone["trial"])})


def knob_confound_finding(run: Run) -> Finding | None:
    """When the ViTs vary a knob that no two configurations vary alone: which knobs move together, between which
    configurations, and which experiment isolates them."""
    vit = run.done("vit")
    if len(vit) < 2:
        return None
    models = vit.drop_duplicates("model").set_index("model")
    varying = [k for k in KNOBS if models[k].dropna().nunique() >= 2]
    lost = [k for k in varying if k not in run.knob_matches]
    if not lost:
        return None
    # knobs that split the configurations the same way move together: one group each
    groups: list[list[str]] = []
    for k in lost:
        part = models[k].astype(str)
        for grp in groups:
            other = models[grp[0]].astype(str)
            if (part.groupby(other).nunique() == 1).all() and (other.groupby(part).nunique() == 1).all():
                grp.append(k)
                break
        else:
            groups.append([k])
    sentences, values = [], {}
    for grp in groups:
        rest = [k for k in KNOBS if k not in grp]
        key = models[rest].astype(str).agg("|".join, axis=1)
        pairs = [(a, b) for _, g in models.groupby(key) for a, b in zip(g.index[:-1], g.index[1:])
                 if any(g.loc[a, k] != g.loc[b, k] for k in grp)]
        names = _and([KNOB_WORDS[k] for k in grp])
        if len(grp) > 1:
            s = f"{names} change together"
        else:
            s = f"{names} never changes alone"
        s += (f" (between {_names([f'{a} and {b}' for a, b in pairs], 3)})" if pairs else
              " (no two configurations differ in it and nothing else)")
        sentences.append(s)
        values[",".join(grp)] = pairs
    text = ("Knob effects: the completed ViTs vary several knobs at once, so no effect of "
            + _and([KNOB_WORDS[k] for k in lost], "or") + " can be isolated from this run: " + "; ".join(sentences)
            + ". The built-in `full` experiment (experiments/full.yaml) runs every combination of the knobs and "
              "isolates each.")
    return Finding("knob_confounded", text, {"knobs": lost, "groups": values})
