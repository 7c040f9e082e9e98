"""The report's section on the estimate: predicted against measured time, per trial and for the run's wall time
(raybench.estimate made the prediction before the run; trials.parquet and estimate.json keep it)."""
from __future__ import annotations

import math

from raybench import estimate


def prediction_section(run) -> list[str]:
    """Markdown lines; none where the run has no prediction (a run from before the estimate, or without one)."""
    t = run.trials
    if "predicted_time_s" not in t or not t.predicted_time_s.notna().any():
        return []
    both = t[t.predicted_time_s.notna() & t.total_time_s.notna() & (t.total_time_s > 0)]
    lines = ["## Predicted and actual time", "",
             "Predicted before the run by calibrating each model on its device (docs/results.md, `estimate.json`); "
             "times are trials.parquet's `total_time_s` (training, evaluation, feature pass, compile)."]
    est = estimate.read(run.path) or {}
    if est.get("actual_wall_s"):
        off = (est["wall_s"] - est["actual_wall_s"]) / est["actual_wall_s"]
        lines += ["", f"Wall time of the trials: predicted {estimate.fmt_s(est['wall_s'])}, actual "
                      f"{estimate.fmt_s(est['actual_wall_s'])} (prediction {100 * off:+.0f}%)."]
    if len(both):
        ratio = both.predicted_time_s / both.total_time_s
        lines += ["", "| trial | predicted | actual | predicted / actual |", "|---|---:|---:|---:|"]
        lines += [f"| {r.trial} | {estimate.fmt_s(r.predicted_time_s)} | {estimate.fmt_s(r.total_time_s)} | "
                  f"{q:.2f} |" for r, q in zip(both.itertuples(), ratio)]
        worst = both.trial.iloc[int((ratio.apply(math.log)).abs().values.argmax())]
        lines += ["", f"Median predicted / actual {ratio.median():.2f}; furthest off: {worst}."]
    return lines + [""]
