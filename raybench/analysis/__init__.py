"""Parquet in, tables, plots and a report out: the analysis of one `python -m raybench.grid` run folder.

    python -m raybench.analysis results/<run>              # writes results/<run>/analysis/
    python -m raybench.analysis results/<run> --out DIR

Input contract: docs/results.md; how each figure is derived: docs/analysis.md. The modules follow the data:

    load      Run, load_run: trials.parquet + epochs.parquet -> per-trial and per-configuration frames
    diagnose  each trial's learning diagnosis from its epoch rows (load adds it to per_trial)
    usage     what each time measured: train TFLOP/s, its share of the best per device, shared epochs
    tables    summary_tables, write_tables: the frames' columns as tables, Markdown and Parquet
    plots     make_plots: PNG + SVG
    findings  findings, caveats: the report's sentences, each computed from the data
    report    write_report, analyse: all of the above into one folder, report.md last
"""
from raybench.analysis.findings import Finding, caveats, findings
from raybench.analysis.load import Run, data_label, find_run_dir, load_run
from raybench.analysis.plots import family_colors, make_plots
from raybench.analysis.report import analyse, write_report
from raybench.analysis.tables import pareto_front, summary_tables, table_titles, to_markdown, write_tables
from raybench.records import epoch_summary

__all__ = ["Finding", "Run", "analyse", "caveats", "data_label", "epoch_summary", "family_colors",
           "find_run_dir", "findings", "load_run", "make_plots", "pareto_front", "summary_tables", "table_titles",
           "to_markdown", "write_report", "write_tables"]
