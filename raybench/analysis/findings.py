"""The report's sentences: the discussion (one Finding per claim) and the caveats.

Every finding comes from a function below that returns nothing when the run lacks the data for it, so a
partial run gives a shorter report, never an invented one. Claims use complete configurations only (status
ok, every planned epoch recorded): a trial a scheduler stopped early, a failed or a running one makes none.
A family is named by its own name; only family "vit" is called a ViT and only "resnet" ResNet-18.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from raybench.analysis.load import BUILT_IN, Run
from raybench.analysis.tables import FLOPS_NOTE, KNOB_LABELS, num
from raybench.records import STOPPED_EARLY


@dataclass(frozen=True)
class Finding:
    """One sentence of the discussion and the numbers it states (tests and notebooks read `values`)."""
    topic: str
    text: str
    values: dict


def findings(run: Run) -> list[Finding]:
    """The discussion: each finding is computed here from the data, and absent when the data is."""
    out = [*best_vit_vs_resnet(run), *resnet_findings(run), *knob_findings(run), flops_finding(run),
           efficiency_finding(run), *swin_findings(run), *family_findings(run), recipe_finding(run),
           seed_noise_finding(run)]
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
    out = []
    if "synthetic data" in run.label:
        out.append("Data: synthetic data. The accuracies test the pipeline, not the models; only the "
                   "costs (params, FLOPs, time) carry over to real data.")
    else:
        out.append(f"Data: {run.label}.")
    plan = pt.groupby(["family", "recipe"], sort=False)[["epochs_planned", "image_size"]].agg(
        lambda s: "/".join(num(v) for v in sorted(s.dropna().unique())))
    plan = plan.reindex(sorted(plan.index, key=lambda k: (run.families.index(k[0]), k[1])))
    out.append("Epochs planned and input size: " + "; ".join(
        f"{f} ({r}): {row.epochs_planned} epochs at {row.image_size} px" for (f, r), row in plan.iterrows())
        + ". Families trained for different budgets and input sizes are not a like-for-like accuracy comparison.")
    out.append(f"Device: {', '.join(run.devices) or 'not recorded'}"
               + (f" on {run.epochs['node_id'].nunique()} Ray node(s)" if "node_id" in run.epochs
                  and run.epochs["node_id"].astype(str).str.len().gt(0).any() else "")
               + ". Time per epoch is training steps only (mean over recorded epochs); trial time adds "
                 "evaluation, compilation and a frozen backbone's feature pass; trials sharing a GPU slow each "
                 "other down.")
    out.append(_precision_caveat(pt))
    versions = _versions(pt)
    if versions:
        out.append("Versions: " + "; ".join(versions) + ".")
    counts = pt["status"].value_counts()
    out.append("Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + (" (each failed or unfinished trial and its error: under What is missing)" if run.missing else "")
               + ". Only completed trials (status ok, every planned epoch recorded) enter the discussion, "
                 "the scatter plots and the knob effects; means are over seeds where n > 1."
               + (f" The {counts[STOPPED_EARLY]} stopped-early trial(s) were ended by the scheduler (ASHA) for "
                  "falling behind, not by a failure: they are in the per-trial table and the learning curves "
                  "(dash-dot), with the accuracy they had when stopped." if STOPPED_EARLY in counts else ""))
    return out


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
