"""The report: every table, plot and sentence of a run written into one folder, with report.md last."""
from __future__ import annotations

from pathlib import Path

from raybench.analysis.findings import caveats, findings
from raybench.analysis.load import Run, load_run
from raybench.analysis.plots import PLOT_STEMS, make_plots
from raybench.analysis.prediction import prediction_section
from raybench.analysis.tables import save_tables, summary_tables, table_titles, to_markdown


def write_report(run: Run, out_dir, plots: list[Path] | None = None) -> Path:
    """Writes the tables, the plots (unless given) and report.md into out_dir; returns report.md's path."""
    out_dir = Path(out_dir)
    titles, tables = table_titles(run), summary_tables(run)
    written = save_tables(tables, titles, out_dir)
    plots = make_plots(run, out_dir) if plots is None else plots
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
    lines += ["", *prediction_section(run), "## Tables", ""]
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
